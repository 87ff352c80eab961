//! Entry point of `counterweight-webhook`: flags, tracing, run until SIGTERM or Ctrl-C.

use clap::Parser;
use counterweight_runtime::{logging, shutdown};

/// mimalloc instead of the C library's allocator. The image is a static musl
/// binary, and musl's allocator takes one global lock; glibc's, in the
/// benchmarks, merges its freed small chunks whenever a request above 1 KiB
/// arrives, which every injected answer (a 2 KB patch) is. The admission
/// bench runs with this same allocator, for both sides, so its numbers are
/// this binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let args = counterweight_webhook::Args::parse();
    logging::init("info", logging::Output::Stdout);
    // Kubernetes stops pods with SIGTERM; Ctrl-C is for humans.
    counterweight_webhook::run(args, shutdown::on_signal()?).await?;
    Ok(())
}
