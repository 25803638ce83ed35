//! Command-line arguments: the global connection flags and one struct per subcommand.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tonic::transport::Endpoint;

/// The gateway's default address; every command goes there unless `--endpoint` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:8000";
/// The model `classify` uses when none is named: the ImageNet classifier every install has.
pub const DEFAULT_CLASSIFY_MODEL: &str = "efficientnet_lite0";

#[derive(Parser)]
#[command(
    name = "marquee",
    version,
    about = "Marquee command line: classify images, generate text, get recommendations, check health, read model metadata"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand accepts, before or after its name.
#[derive(Args)]
pub struct GlobalArgs {
    /// Server address, e.g. `http://127.0.0.1:8000` (`http://` is assumed when omitted).
    #[arg(
        long,
        global = true,
        env = "MARQUEE_ENDPOINT",
        default_value = DEFAULT_ENDPOINT,
        value_parser = parse_endpoint
    )]
    pub endpoint: Endpoint,

    /// API key, sent as `x-api-key` metadata. Never printed.
    #[arg(long, global = true, env = "MARQUEE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Deadline of each call in seconds, sent to the server as `grpc-timeout`.
    #[arg(long, global = true, default_value = "30", value_parser = parse_timeout, value_name = "SECONDS")]
    pub timeout: Duration,

    /// Print the result as JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Classify one image (JPEG, PNG, WebP or GIF) and print the most likely labels.
    Classify(ClassifyArgs),
    /// Check that the server, and optionally some models, are serving. Exits 1 when not.
    Health(HealthArgs),
    /// Show models' versions, platform and input/output tensors (all models by default).
    Models(ModelsArgs),
    /// Generate text (`TextGeneration.GenerateStream`), printed as it is generated; the
    /// summary (finish reason, tokens, seed, timings) goes to stderr.
    Generate(GenerateArgs),
    /// Recommend items for a user (`Recommender.Recommend`), or for an anonymous visitor from
    /// the items they just interacted with.
    Recommend(RecommendArgs),
}

#[derive(Args)]
pub struct ClassifyArgs {
    /// The image file; `-` reads it from stdin.
    pub image: PathBuf,
    /// The model to classify with.
    #[arg(long, default_value = DEFAULT_CLASSIFY_MODEL)]
    pub model: String,
    /// How many labels to print, most likely first.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub top_k: u32,
}

#[derive(Args)]
pub struct HealthArgs {
    /// A service to check with `grpc.health.v1` as well as the server (repeatable).
    #[arg(long = "service", value_name = "NAME")]
    pub services: Vec<String>,
    /// A model to check with the Open Inference Protocol's `ModelReady` (repeatable); also
    /// checks `ServerReady`.
    #[arg(long = "model", value_name = "NAME")]
    pub models: Vec<String>,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// The prompt.
    pub prompt: String,
    /// Model; the service's own when unset.
    #[arg(long)]
    pub model: Option<String>,
    /// Most tokens to generate (the service's default when unset).
    #[arg(long)]
    pub max_new_tokens: Option<u32>,
    /// Sampling temperature; greedy when no sampling option is given.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<i32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// A stop sequence (repeatable, up to 4); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Seed, for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Independent samples of the prompt (needs a sampling option), printed one after the
    /// other once all are done; they share one prefill on the server.
    #[arg(long, short = 'n', default_value_t = 1)]
    pub num_return_sequences: u32,
}

#[derive(Args)]
pub struct RecommendArgs {
    /// The user id; without it, `--recent` items describe an anonymous visitor.
    #[arg(long)]
    pub user: Option<i64>,
    /// An item the anonymous visitor interacted with (repeatable), oldest first.
    #[arg(long, conflicts_with = "user")]
    pub recent: Vec<i64>,
    /// How many items.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub k: u32,
    /// Diversity weight λ in [0, 1] (the service's default when unset).
    #[arg(long)]
    pub diversity: Option<f32>,
    /// Explain each item: the history items and ranking features behind it.
    #[arg(long)]
    pub explain: bool,
}

#[derive(Args)]
pub struct ModelsArgs {
    /// A model to describe (repeatable); without it, every model the server lists.
    #[arg(long = "model", value_name = "NAME")]
    pub models: Vec<String>,
}

/// Parses `--endpoint`; a bare `host:port` gets `http://`. TLS is not compiled in, so `https://`
/// is refused here rather than failing obscurely at connect time.
fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    let uri = if s.contains("://") {
        s.to_owned()
    } else {
        format!("http://{s}")
    };
    if uri.starts_with("https://") {
        return Err("https endpoints are not supported by this build (no TLS); use http://".into());
    }
    if !uri.starts_with("http://") {
        return Err(format!("expected http://HOST:PORT, got `{s}`"));
    }
    Endpoint::from_shared(uri).map_err(|e| format!("expected http://HOST:PORT, got `{s}`: {e}"))
}

/// Parses `--timeout` in (possibly fractional) seconds; zero or negative would fail every call.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("expected a number of seconds, got `{s}`"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("must be more than 0 seconds, got `{s}`"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn endpoint_gets_a_scheme_and_refuses_tls() {
        assert_eq!(
            parse_endpoint("127.0.0.1:8000").unwrap().uri().to_string(),
            "http://127.0.0.1:8000/"
        );
        assert_eq!(
            parse_endpoint("http://localhost:9")
                .unwrap()
                .uri()
                .to_string(),
            "http://localhost:9/"
        );
        assert!(parse_endpoint("https://example.com").is_err());
        assert!(parse_endpoint("ftp://example.com").is_err());
        assert!(parse_endpoint("http://bad host").is_err());
    }

    #[test]
    fn timeout_accepts_fractions_and_refuses_nonsense() {
        assert_eq!(parse_timeout("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_timeout("0.5").unwrap(), Duration::from_millis(500));
        for bad in ["0", "-1", "abc", "inf", "NaN"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "marquee",
            "classify",
            "x.png",
            "--top-k",
            "3",
            "--json",
            "--timeout",
            "2",
            "--endpoint",
            "10.0.0.1:8001",
        ])
        .unwrap();
        assert!(cli.global.json);
        assert_eq!(cli.global.timeout, Duration::from_secs(2));
        assert_eq!(
            cli.global.endpoint.uri().to_string(),
            "http://10.0.0.1:8001/"
        );
        let Command::Classify(args) = cli.command else {
            panic!("expected classify");
        };
        assert_eq!(args.model, DEFAULT_CLASSIFY_MODEL);
        assert_eq!(args.top_k, 3);
    }

    #[test]
    fn usage_errors_are_reported_by_clap() {
        assert!(Cli::try_parse_from(["marquee", "classify", "x.png", "--top-k", "0"]).is_err());
        assert!(Cli::try_parse_from(["marquee", "models", "--model"]).is_err());
        assert!(Cli::try_parse_from(["marquee", "generate"]).is_err());
    }
}
