//! `pcache`: the product cache's operator command. `dev` runs the whole system on this machine
//! with no AWS account and no Docker and keeps it running until Ctrl-C; `set-price` acts on the
//! running stack; `demo` is the one-shot walk-through; `warm`, `inspect`, `purge` and `redrive`
//! act on the running stack or on real AWS. This file only parses and dispatches: the options
//! are in `cli`, where a command acts in `place`, what `dev`, `set-price` and `warm` do in
//! `commands`, the operator commands in `ops`, and the machinery in the libraries.

mod cli;
mod commands;
mod ops;
mod place;
mod serverless;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match Cli::parse().command {
        Command::Dev(args) => commands::dev(args).await,
        Command::Demo { mode } => local_stack::demo::run(mode)
            .await
            .map(|transcript| println!("{transcript}")),
        Command::SetPrice(args) => commands::set_price(args).await,
        Command::Warm(args) => commands::warm(args).await,
        Command::Inspect(args) => ops::inspect(args).await,
        Command::Purge(args) => ops::purge(args).await,
        Command::Redrive(args) => ops::redrive(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pcache: {}", local_stack::error::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
