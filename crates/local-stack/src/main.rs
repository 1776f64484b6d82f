//! `local-stack`: runs the system on this machine with no AWS account and no Docker.
//!
//! Usage: `local-stack [--mode delete|refresh]`. Starts `redis-server` and `moto_server` (unless
//! `REDIS_URL` / `AWS_ENDPOINT_URL_DYNAMODB` name running ones), walks a price change from the
//! table through the stream to the read path, and prints what happened.

use product_cache::config::InvalidationMode;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let mut mode = InvalidationMode::Delete;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--mode", Some(m)) => match m.parse() {
                Ok(m) => mode = m,
                Err(e) => return usage(&e),
            },
            _ => return usage(&format!("unexpected argument `{arg}`")),
        }
    }
    match local_stack::demo::run(mode).await {
        Ok(transcript) => {
            println!("{transcript}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("local-stack: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn usage(problem: &str) -> std::process::ExitCode {
    eprintln!("local-stack: {problem}\nusage: local-stack [--mode delete|refresh]");
    std::process::ExitCode::from(2)
}
