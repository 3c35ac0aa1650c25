//! Free TCP ports for processes a test starts.
//!
//! A port is free when picked, and the test binds it soon after. Two things
//! could take it in between, and both are ruled out:
//! - the port is never one the kernel hands out for outgoing connections,
//!   because it lies below the ephemeral range;
//! - this process never returns the same port twice, because the ports walk
//!   forward from an offset drawn from the process id.
//!
//! A bare bind to port 0 does neither, and a port collision once failed CI.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out.
const LOW: u32 = 10_000;

/// How many ports this process has tried so far.
static TRIED: AtomicU32 = AtomicU32::new(0);

/// The first port of the kernel's ephemeral range (Linux: 32768 by default).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .filter(|p| *p > LOW + 1000)
        .unwrap_or(32_768)
}

/// A free port on 127.0.0.1.
#[allow(clippy::expect_used)] // a test machine without a free loopback port cannot run the test
pub fn free_port() -> u16 {
    free_port_on("127.0.0.1").expect("no free port on 127.0.0.1")
}

/// A free port on `host` (an address of this machine).
pub fn free_port_on(host: &str) -> std::io::Result<u16> {
    let span = ephemeral_start() - LOW;
    let offset = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = TRIED.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (offset + n) % span;
        let Ok(port) = u16::try_from(port) else { continue };
        if TcpListener::bind((host, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port on {host} below the ephemeral range"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_not_ephemeral() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice: {ports:?}");
        for p in &ports {
            assert!(
                u32::from(*p) >= LOW && u32::from(*p) < ephemeral_start(),
                "{p} is out of range"
            );
        }
        TcpListener::bind(("127.0.0.1", ports[0])).unwrap();
    }
}
