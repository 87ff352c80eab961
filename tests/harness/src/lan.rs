//! A host-only LAN between the harness's network namespaces, with links a test can cut.
//!
//! A [`Lan`] is a Linux bridge on the host with the address `10.251.<k>.1/24`, where `k` is
//! the first subnet no host interface uses yet. [`Lan::attach`] links a [`Namespaces`] to it
//! with a veth pair: `eth0` inside, with `10.251.<k>.<i>/24`, and a host end enslaved to the
//! bridge. The test process reaches every namespace's address (an API server bound there)
//! through the bridge's own address, and namespaces reach each other over the bridge, so
//! clusters talk as they would on a real network.
//!
//! Nothing on the LAN can reach beyond it: the namespaces get no default route (only the
//! connected /24), the bridge has IPv4 forwarding off (`net.ipv4.conf.<bridge>.forwarding=0`:
//! the host never routes a packet that came in from the LAN, whatever `ip_forward` says), and
//! IPv6 is disabled on the bridge and the host veths.
//!
//! [`Link::cut`] sets the host end of a veth down: the namespace keeps its address but nothing
//! crosses, a real partition (no proxy in the path). [`Link::heal`] sets it up again; the
//! bridge runs no STP, so the port forwards at once.

use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, Ordering};

use crate::HarnessError;
use crate::netns::{Namespaces, run_sh};
use crate::undo::{Undo, sh_quote};

/// A host bridge linking namespaces; removed on drop.
#[derive(Debug)]
pub struct Lan {
    k: u8,
    bridge: String,
    next: AtomicU16,
    undo: Mutex<Undo>,
}

/// One namespace's link to a [`Lan`]: the veth pair and the namespace's address.
#[derive(Debug, Clone)]
pub struct Link {
    host_if: String,
    addr: Ipv4Addr,
}

/// Serializes the choice of a free subnet between the LANs of one process.
static CHOOSING: Mutex<()> = Mutex::new(());

impl Lan {
    /// Creates a bridge on the first free `10.251.<k>.0/24`.
    pub fn new() -> Result<Self, HarnessError> {
        let _guard = CHOOSING.lock().unwrap_or_else(|p| p.into_inner());
        let used = run_sh("ip -o -4 addr show", "listing host addresses")?;
        let links = run_sh("ip -o link show", "listing host links")?;
        let k = (1..=250u8)
            .find(|k| {
                !used.contains(&format!(" 10.251.{k}.")) && !links.contains(&format!(" cwbr{k}:"))
            })
            .ok_or_else(|| {
                HarnessError::io(
                    "choosing a LAN subnet",
                    std::io::Error::other("10.251.1-250.0/24 all in use"),
                )
            })?;
        let bridge = format!("cwbr{k}");
        let mut undo = Undo::new(&format!("lan-{bridge}"))?;
        let qb = sh_quote(&bridge);
        undo.push(format!("ip link del {qb} 2>/dev/null || true"))?;
        run_sh(
            &format!(
                "set -e\n\
                 ip link add {qb} type bridge stp_state 0 forward_delay 0\n\
                 sysctl -qw net.ipv6.conf.{bridge}.disable_ipv6=1\n\
                 sysctl -qw net.ipv4.conf.{bridge}.forwarding=0\n\
                 ip addr add 10.251.{k}.1/24 dev {qb}\n\
                 ip link set {qb} up"
            ),
            &format!("creating bridge {bridge}"),
        )?;
        Ok(Self {
            k,
            bridge,
            next: AtomicU16::new(10),
            undo: Mutex::new(undo),
        })
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The host's address on the LAN.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 251, self.k, 1)
    }

    /// Links `ns` to the LAN as `eth0` with the next free address; the host end's removal goes
    /// to `undo` (the namespace's own undo script, so it goes with the namespace).
    pub fn attach(&self, ns: &Namespaces, undo: &mut Undo) -> Result<Link, HarnessError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let i = u8::try_from(i).ok().filter(|i| *i <= 250).ok_or_else(|| {
            HarnessError::io(
                "attaching to a LAN",
                std::io::Error::other("no address left"),
            )
        })?;
        let host_if = format!("cw{}h{i}", self.k);
        let addr = Ipv4Addr::new(10, 251, self.k, i);
        let qh = sh_quote(&host_if);
        let qn = sh_quote(ns.name());
        undo.push(format!("ip link del {qh} 2>/dev/null || true"))?;
        run_sh(
            &format!(
                "set -e\n\
                 ip link add {qh} type veth peer name eth0 netns {qn}\n\
                 sysctl -qw net.ipv6.conf.{host_if}.disable_ipv6=1\n\
                 ip link set {qh} master {} up\n\
                 ip -n {qn} addr add {addr}/24 dev eth0\n\
                 ip -n {qn} link set eth0 up",
                sh_quote(&self.bridge)
            ),
            &format!("linking {} to {}", ns.name(), self.bridge),
        )?;
        Ok(Link { host_if, addr })
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.undo.lock().unwrap_or_else(|p| p.into_inner()).run();
    }
}

impl Link {
    /// The namespace's address on the LAN.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The host end of the veth pair.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// Cuts the link: nothing crosses until [`Link::heal`].
    pub fn cut(&self) -> Result<(), HarnessError> {
        self.set("down")
    }

    /// Heals a cut link.
    pub fn heal(&self) -> Result<(), HarnessError> {
        self.set("up")
    }

    fn set(&self, state: &str) -> Result<(), HarnessError> {
        run_sh(
            &format!("ip link set {} {state}", sh_quote(&self.host_if)),
            &format!("setting {} {state}", self.host_if),
        )
        .map(drop)
    }
}
