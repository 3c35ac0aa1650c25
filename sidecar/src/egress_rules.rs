//! The pod's egress rules (transparent egress): one nftables `inet` table,
//! for IPv4 and IPv6 at once, installed atomically by `mandate-egress-init`
//! in the pod's network namespace before anything of the agent runs.
//!
//! For every UID but the proxy's (Envoy and mandate-sidecar):
//! - every TCP connection leaving the pod goes to Envoy's transparent
//!   listener, whatever the process does (a client that ignores
//!   `HTTP_PROXY`, a raw socket, an init container);
//! - DNS (UDP and TCP 53) goes to the sidecar's resolver;
//! - everything else leaving the pod is refused (UDP, ICMP, other protocols);
//! - IPv6 neighbour discovery (which the kernel sends itself, without it no
//!   IPv6 peer is reachable) passes, only as link-local packets (hop limit
//!   255), never routed beyond the node;
//! - on loopback, Mandate's ports are refused except the explicit proxy, so
//!   the agent cannot reach Envoy's or the sidecar's other listeners (its own
//!   loopback services keep working).
//!
//! Only the proxy's UID is exempt, never a GID: `fsGroup` and
//! `supplementalGroups` can hand an agent any group.

/// What the rules are built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRules {
    /// The proxy's UID (Envoy and the sidecar), the only one exempt.
    pub proxy_uid: u32,
    /// Envoy's explicit forward proxy (`HTTP_PROXY`), on loopback.
    pub proxy_port: u16,
    /// Envoy's transparent listener, the target of the TCP redirect.
    pub transparent_port: u16,
    /// The sidecar's DNS resolver, the target of port 53's redirect.
    pub dns_port: u16,
    /// Mandate's loopback ports, refused to the agent (the explicit proxy
    /// excepted): Envoy's and the sidecar's listeners.
    pub reserved_ports: (u16, u16),
}

/// The nftables table the rules live in (`nft list table inet mandate`).
pub const TABLE: &str = "mandate";

impl Default for EgressRules {
    fn default() -> Self {
        Self {
            proxy_uid: 15999,
            proxy_port: 15001,
            transparent_port: 15002,
            dns_port: 15053,
            reserved_ports: (15000, 15099),
        }
    }
}

impl EgressRules {
    /// Why these rules would not hold, if they would not.
    pub fn check(&self) -> Result<(), String> {
        if self.proxy_uid == 0 {
            return Err("the proxy UID may not be 0: root would be exempt from the egress rules".into());
        }
        let (lo, hi) = self.reserved_ports;
        if lo > hi {
            return Err(format!("the reserved port range {lo}-{hi} is empty"));
        }
        for (what, port) in [
            ("proxy", self.proxy_port),
            ("transparent", self.transparent_port),
            ("DNS", self.dns_port),
        ] {
            if port == 0 {
                return Err(format!("the {what} port may not be 0"));
            }
            if !(lo..=hi).contains(&port) {
                return Err(format!(
                    "the {what} port {port} is outside Mandate's reserved range {lo}-{hi}, which the agent may not reach on loopback"
                ));
            }
        }
        if self.transparent_port == self.proxy_port || self.dns_port == self.proxy_port {
            return Err("the transparent and DNS ports must differ from the proxy port".into());
        }
        Ok(())
    }

    /// The ruleset, as `nft -f -` reads it. It first creates and deletes the
    /// table, so applying it twice leaves one copy, and the whole file
    /// applies as one transaction (all of it or nothing).
    pub fn ruleset(&self) -> String {
        let EgressRules {
            proxy_uid: uid,
            proxy_port: proxy,
            transparent_port: tproxy,
            dns_port: dns,
            reserved_ports: (lo, hi),
        } = self;
        // Protocol numbers rather than names: the init image has no
        // /etc/protocols. 6 = TCP, 17 = UDP.
        format!(
            r#"table inet {TABLE} {{}}
delete table inet {TABLE}
table inet {TABLE} {{
  chain nat_output {{
    type nat hook output priority -100; policy accept;
    meta skuid {uid} return
    oifname "lo" return
    meta l4proto {{ 6, 17 }} th dport 53 redirect to :{dns}
    meta l4proto 6 redirect to :{tproxy}
  }}
  chain filter_output {{
    type filter hook output priority 0; policy drop;
    meta skuid {uid} accept
    ct state invalid drop
    ct state established,related accept
    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }} ip6 hoplimit 255 accept
    ct status dnat ip daddr 127.0.0.1 tcp dport {tproxy} accept
    ct status dnat ip6 daddr ::1 tcp dport {tproxy} accept
    ct status dnat ip daddr 127.0.0.1 meta l4proto {{ 6, 17 }} th dport {dns} accept
    ct status dnat ip6 daddr ::1 meta l4proto {{ 6, 17 }} th dport {dns} accept
    oifname "lo" tcp dport {proxy} accept
    oifname "lo" tcp dport {lo}-{hi} reject with tcp reset
    oifname "lo" udp dport {lo}-{hi} reject
    oifname "lo" accept
    meta l4proto 6 reject with tcp reset
    reject with icmpx admin-prohibited
  }}
}}
"#
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_proxy_uid_is_exempt_and_the_default_is_refusal() {
        let r = EgressRules::default().ruleset();
        assert!(r.contains("meta skuid 15999 return"));
        assert!(r.contains("meta skuid 15999 accept"));
        assert!(!r.contains("skgid"), "never exempt by group");
        assert!(r.contains("policy drop;"));
        assert!(r.trim_end().ends_with("reject with icmpx admin-prohibited\n  }\n}"));
        // Redirected traffic is accepted by its new destination only when it
        // was redirected: a direct connection to the transparent port would
        // make Envoy connect to itself.
        assert!(r.contains("ct status dnat ip daddr 127.0.0.1 tcp dport 15002 accept"));
        assert!(r.contains("oifname \"lo\" tcp dport 15001 accept"));
        assert!(r.contains("oifname \"lo\" tcp dport 15000-15099 reject"));
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let bad = |f: fn(&mut EgressRules)| {
            let mut r = EgressRules::default();
            f(&mut r);
            r.check().unwrap_err()
        };
        assert!(bad(|r| r.proxy_uid = 0).contains("root"));
        assert!(bad(|r| r.transparent_port = 8080).contains("outside"));
        assert!(bad(|r| r.dns_port = r.proxy_port).contains("differ"));
        assert!(bad(|r| r.reserved_ports = (2, 1)).contains("empty"));
        EgressRules::default().check().unwrap();
    }
}
