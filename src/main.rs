//! The `eventvault` command: parse the command line, set up logging, build
//! the service and serve (or run one of the other commands, `cli::run`).

use std::process::ExitCode;

use clap::Parser;
use eventvault::app::{self, Application, Config};
use eventvault::cli::{self, Cli, Command};

/// The request path allocates and frees many small buffers (JSON, rows,
/// ciphertexts); mimalloc serves that pattern far better than glibc malloc,
/// which dominated the profile (see docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let Cli { store, command } = Cli::parse();
    let outcome = match command {
        Command::Serve(args) => serve(&args.config(&store)).await,
        Command::Admin(command) => cli::run(&store, command).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cfg: &Config) -> Result<(), Box<dyn std::error::Error>> {
    let mut application = Application::build(cfg).await?;
    if let Some(token) = application.take_admin_token() {
        cli::print_admin_token(token.as_str());
    }
    // Signal handlers first: a SIGTERM right after the address is printed
    // must shut down gracefully, not kill the process.
    let shutdown = app::shutdown_signal()?;
    // SIGHUP re-reads the certificates (new handshakes use them).
    let scheme = match application.certificates() {
        Some(certificates) => {
            certificates.reload_on_sighup()?;
            "https"
        }
        None => "http",
    };
    println!(
        "eventvault listening on {scheme}://{}",
        application.local_addr()
    );
    // Data is served once the forget ledger is re-applied and the data keys
    // are checked; the line says so to whoever started the process (as
    // `/readyz` does).
    let mut progress = application.progress();
    tokio::spawn(async move {
        if progress.ready().await.is_ok() {
            println!("eventvault ready");
        }
    });
    application.run_until(shutdown).await?;
    Ok(())
}
