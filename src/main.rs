//! The `loraplex` binary: parses the command line and reports errors without panicking.

fn main() -> std::process::ExitCode {
    loraplex::init_threads();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LORAPLEX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = loraplex::cli::Cli::parse_with_defaults();
    match loraplex::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
