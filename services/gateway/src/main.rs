//! `marquee-gateway`: parses the config, initialises telemetry, serves until SIGTERM, drains.

use std::path::PathBuf;

use clap::Parser;
use marquee_core::config::EXIT_CONFIG;
use marquee_core::serve::{Started, run_binary};

#[derive(Parser)]
#[command(
    version,
    about = "Marquee gateway: auth, quotas, routing, batching and balancing in front of the model services"
)]
struct Args {
    /// TOML config file; `MARQUEE__SECTION__KEY` env vars override it.
    #[arg(long, env = "MARQUEE_CONFIG")]
    config: Option<PathBuf>,
    /// Print the SHA-256 to configure for an API key (read from stdin) and exit.
    #[arg(long)]
    hash_key: bool,
}

fn main() {
    let args = Args::parse();
    if args.hash_key {
        let mut key = String::new();
        if std::io::stdin().read_line(&mut key).is_err() {
            std::process::exit(EXIT_CONFIG);
        }
        println!(
            "{}",
            marquee_gateway::auth::hash_key(key.trim_end_matches(['\n', '\r']))
        );
        return;
    }
    let settings: marquee_gateway::config::Settings =
        match marquee_core::config::load(args.config.as_deref()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(EXIT_CONFIG);
            }
        };
    // Key files are part of the configuration: unreadable or invalid ones are a config error.
    if let Err(errors) =
        marquee_gateway::auth::Authenticator::new(&settings.auth, &settings.tenants)
    {
        eprintln!("invalid configuration:\n  - {}", errors.join("\n  - "));
        std::process::exit(EXIT_CONFIG);
    }
    let (server, telemetry) = (settings.server.clone(), settings.telemetry.clone());
    let code = run_binary(
        marquee_gateway::NAME,
        &server,
        &telemetry,
        |shutdown| async move {
            let r = marquee_gateway::start(settings, shutdown).await?;
            Ok(Started {
                grpc_addr: r.grpc_addr,
                admin_addr: r.admin_addr,
                task: r.task,
            })
        },
    );
    std::process::exit(code);
}
