//! Free TCP ports for processes a test starts.
//!
//! The port is free when picked; a test binds it soon after. (Another
//! process could take it in between; on a test machine that does not happen
//! in practice.)

use std::net::TcpListener;

/// A free port on 127.0.0.1.
#[allow(clippy::expect_used)] // a test machine without a free loopback port cannot run the test
pub fn free_port() -> u16 {
    free_port_on("127.0.0.1").expect("no free port on 127.0.0.1")
}

/// A free port on `host` (an address of this machine).
pub fn free_port_on(host: &str) -> std::io::Result<u16> {
    Ok(TcpListener::bind((host, 0))?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_can_be_bound() {
        let p = free_port();
        assert_ne!(p, 0);
        TcpListener::bind(("127.0.0.1", p)).unwrap();
        assert_ne!(free_port_on("127.0.0.1").unwrap(), 0);
    }
}
