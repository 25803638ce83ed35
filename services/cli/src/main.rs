//! `marquee`: the command line for Marquee services: classify images, generate text, get
//! recommendations, check health, read model metadata. It talks plain gRPC to the gateway (or any service) and never links libtorch.
#![forbid(unsafe_code)]

mod classify;
mod cli;
mod connection;
mod generate;
mod health;
mod models;
mod output;
mod recommend;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::connection::Connection;

/// Exit status of a failed call, an unreadable input or a service that is not serving.
const EXIT_FAILURE: u8 = 1;
/// Exit status of a usage error; clap uses the same value for the errors it detects.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let json = cli.global.json;
    let result = runtime.block_on(async {
        // Inside the runtime: the channel spawns its connection task.
        let conn = match Connection::new(&cli.global) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return Err(ExitCode::from(EXIT_USAGE));
            }
        };
        Ok(match cli.command {
            Command::Classify(args) => classify::run(&conn, args, json).await,
            Command::Health(args) => health::run(&conn, args, json).await,
            Command::Models(args) => models::run(&conn, args, json).await,
            Command::Generate(args) => generate::run(&conn, args, json).await,
            Command::Recommend(args) => recommend::run(&conn, args, json).await,
        })
    });
    let result = match result {
        Ok(r) => r,
        Err(code) => return code,
    };
    match result {
        Ok(outcome) => {
            print!("{}", outcome.stdout);
            if outcome.success {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => {
            eprintln!("error: {}", output::describe_error(&e));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
