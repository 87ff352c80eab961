//! `cw-clusters`: start local Kubernetes control planes for humans.
//!
//! Brings up N clusters with the same harness the e2e tests use, prints where
//! their kubeconfigs are, and keeps them running until Ctrl-C.

use std::path::PathBuf;

use clap::Parser;

/// Start local Kubernetes clusters (etcd, kube-apiserver,
/// kube-controller-manager, kube-scheduler, KWOK) on loopback and print their
/// kubeconfigs. Everything stops on Ctrl-C.
#[derive(Parser, Debug)]
#[command(name = "cw-clusters", version)]
struct Args {
    /// Cluster names; one control plane each.
    #[arg(
        long,
        env = "CW_CLUSTERS",
        value_delimiter = ',',
        default_value = "east,west"
    )]
    names: Vec<String>,

    /// Where to write a kubeconfig holding one context per cluster.
    #[arg(
        long,
        env = "CW_CLUSTERS_KUBECONFIG",
        default_value = "counterweight.kubeconfig"
    )]
    kubeconfig: PathBuf,

    /// Give every cluster a real node (kubelet, containerd, in namespaces of its own, linked
    /// by a host bridge) instead of KWOK. Needs root and `tools/controlplane/node.sh`.
    #[arg(long)]
    real: bool,

    /// With `--real`: route as cluster nodes do (`RealNode::route_like_a_node`): pods reach
    /// the other clusters' NodePorts over the LAN, the API server reaches Service addresses.
    #[arg(long, requires = "real")]
    route_pods: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let started = std::time::Instant::now();
    let (_lan, clusters) = if args.real {
        let (lan, clusters) = counterweight_harness::start_real_named(&args.names).await?;
        if args.route_pods {
            for c in &clusters {
                if let Some(node) = c.real_node() {
                    node.route_like_a_node()?;
                }
            }
        }
        (Some(lan), clusters)
    } else {
        (None, counterweight_harness::start_named(&args.names).await?)
    };
    counterweight_harness::write_merged_kubeconfig(&clusters, &args.kubeconfig)?;
    println!(
        "{} cluster(s) up in {:.1}s",
        clusters.len(),
        started.elapsed().as_secs_f64()
    );
    for c in &clusters {
        println!(
            "  {:<8} {}  kubeconfig {}  (logs in {})",
            c.name(),
            c.server_url(),
            c.kubeconfig().display(),
            c.dir().join("logs").display()
        );
    }
    println!(
        "all contexts: export KUBECONFIG={}",
        std::path::absolute(&args.kubeconfig)?.display()
    );
    println!("press Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    drop(clusters);
    Ok(())
}
