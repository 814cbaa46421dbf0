//! The `tokenchat` command: parses the command line and hands over to [`tokenchat::cli`].
//! A usage error exits with status 2 and clap's message.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    tokenchat::cli::run(tokenchat::cli::Cli::parse()).await
}
