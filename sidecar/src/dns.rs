//! The pod's DNS resolver: answers only names the pod's policies allow.
//!
//! With transparent egress, the pod's nftables rules send every DNS query of
//! the agent (UDP and TCP port 53) here. DNS is an exfiltration channel (a
//! prompt-injected agent can leak data in the names it looks up, to whoever
//! runs the authoritative server of a domain), so a query is forwarded to
//! the upstream nameservers only when its name is
//!
//! - declared as an egress host by a policy in force (exactly, or a strict
//!   subdomain of a `*.suffix` pattern), read from the current policy set on
//!   every query, so reloads take effect at once; or
//! - under the cluster's DNS domain (`--dns-cluster-domain`), so services
//!   and the search list's expansions (`x.ns.svc.cluster.local`) work.
//!
//! Every other name is answered NXDOMAIN here and never leaves the pod.
//! For an allowed name, only the query types that find an address to
//! connect to are forwarded: A, AAAA, CNAME, SVCB, HTTPS and SRV. The rest
//! (TXT, NULL, ANY, MX, PTR...) carry arbitrary data back to the agent, or
//! serve no connection, and get NOERROR with no records (NODATA); zone
//! transfers are REFUSED. The forwarded query is rebuilt, not copied: the
//! name in lower case (case patterns cannot carry bits), a fresh message id,
//! and no EDNS options (cookies, client subnet, padding could carry data).
//! The upstream's answer is relayed with the client's id and question; an
//! upstream that fails or does not answer in time is a SERVFAIL, never an
//! invented answer.
//!
//! Messages are parsed and written with `hickory-proto`. A packet that does
//! not parse is dropped (UDP) or ends its connection (TCP). The work is
//! bounded: queries in flight, TCP connections, their idle time, and
//! message sizes.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use mandate_policy::engine::{PolicySet, SharedPolicies, host_matches, normalize_host};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// How long the upstreams have to answer one query, all tries together.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries being answered at once (UDP and TCP together); a UDP query
/// beyond it is dropped (the client retries).
pub const MAX_IN_FLIGHT: usize = 256;
/// TCP connections open at once; one beyond it is closed at once.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// How long a TCP connection may take to send its next query.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest query accepted: a query is one question (a name is at most
/// 255 bytes) and an OPT record; anything larger is not a stub's query.
pub const MAX_QUERY_BYTES: usize = 4096;
/// The UDP payload size the resolver advertises, and the most it asks
/// upstreams for (the DNS flag day's 1232).
pub const UDP_PAYLOAD: u16 = 1232;
/// Refused names logged at most once per this long each.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Refused-query lines logged per [`LOG_EVERY`] at most, whatever the names.
const LOG_LINES_PER_WINDOW: u32 = 100;
/// Names remembered for [`LOG_EVERY`].
const LOG_NAMES: usize = 1024;

/// The resolver's settings.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Where to serve (UDP and TCP on each).
    pub listen: Vec<SocketAddr>,
    /// Where allowed queries go, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// Names under it always resolve.
    pub cluster_domain: String,
    /// How long the upstreams have, in all.
    pub timeout: Duration,
}

/// What to do with one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// An allowed name and type: ask the upstreams.
    Forward,
    /// An allowed name, a type that carries data: NOERROR, no records.
    NoData,
    /// A name no policy allows: NXDOMAIN, never forwarded.
    NxDomain,
    /// Not class IN, or a zone transfer: REFUSED.
    Refused,
    /// Not exactly one question: FORMERR.
    FormErr,
    /// An opcode other than QUERY: NOTIMP.
    NotImp,
}

/// The query types forwarded for an allowed name: the ones that lead to
/// an address to connect to.
pub fn forwarded_type(t: RecordType) -> bool {
    matches!(
        t,
        RecordType::A | RecordType::AAAA | RecordType::CNAME | RecordType::SVCB | RecordType::HTTPS | RecordType::SRV
    )
}

/// `name` as policies compare it (lower case, no trailing dot), when every
/// label is letters, digits, `-` and `_` (the last for SRV's `_service`);
/// `None` otherwise. A label with a dot, a backslash or any other byte
/// inside must never be compared as text: `x\.allowed.example` is a name
/// under `example`, not under `allowed.example`.
pub fn plain_name(name: &Name) -> Option<String> {
    let mut out = String::with_capacity(name.len());
    for label in name.iter() {
        if label.is_empty()
            || !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
    }
    (!out.is_empty()).then_some(out)
}

/// Whether `name` (normalized) is `domain` or under it.
fn under(name: &str, domain: &str) -> bool {
    !domain.is_empty() && (name == domain || host_matches(&format!("*.{domain}"), name))
}

/// Whether the resolver answers `name` at all: a policy declares it, or it
/// is under the cluster's domain.
pub fn allowed_name(name: &Name, policies: &PolicySet, cluster_domain: &str) -> bool {
    plain_name(name).is_some_and(|n| under(&n, &normalize_host(cluster_domain)) || policies.resolves(&n))
}

/// Decide one query.
pub fn decide(query: &Message, policies: &PolicySet, cluster_domain: &str) -> Verdict {
    if query.op_code() != OpCode::Query {
        return Verdict::NotImp;
    }
    let [q] = query.queries() else {
        return Verdict::FormErr;
    };
    if q.query_class() != DNSClass::IN {
        return Verdict::Refused;
    }
    if !allowed_name(q.name(), policies, cluster_domain) {
        return Verdict::NxDomain;
    }
    match q.query_type() {
        RecordType::AXFR | RecordType::IXFR => Verdict::Refused,
        t if forwarded_type(t) => Verdict::Forward,
        _ => Verdict::NoData,
    }
}

/// An answer made here, with no records.
pub fn local_answer(query: &Message, code: ResponseCode) -> Message {
    let mut m = Message::error_msg(query.id(), query.op_code(), code);
    m.set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_checking_disabled(query.checking_disabled())
        // NXDOMAIN and NODATA as an authority would give them, so stubs stop.
        .set_authoritative(matches!(code, ResponseCode::NXDomain | ResponseCode::NoError));
    if query.queries().len() == 1 {
        m.add_queries(query.queries().iter().cloned());
    }
    if query.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_PAYLOAD);
        m.set_edns(edns);
    }
    m
}

/// The query sent upstream for `query`'s question `q`: the name in lower
/// case, a fresh id, recursion as asked, EDNS without options.
fn upstream_query(query: &Message, q: &Query, id: u16, udp: bool) -> Message {
    let mut out = Message::new();
    out.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(query.recursion_desired())
        .set_checking_disabled(query.checking_disabled());
    let mut lower = q.clone();
    lower.set_name(q.name().to_lowercase());
    out.add_query(lower);
    if let Some(theirs) = query.extensions() {
        let mut edns = Edns::new();
        let payload = if udp {
            theirs.max_payload().clamp(512, UDP_PAYLOAD)
        } else {
            UDP_PAYLOAD
        };
        edns.set_max_payload(payload).set_dnssec_ok(theirs.flags().dnssec_ok);
        out.set_edns(edns);
    }
    out
}

/// Whether `resp` answers the query `id` for `q`.
fn answers(resp: &Message, id: u16, q: &Query) -> bool {
    resp.message_type() == MessageType::Response
        && resp.id() == id
        && matches!(resp.queries(), [r] if r.name().eq_ignore_root(q.name())
            && r.query_type() == q.query_type()
            && r.query_class() == q.query_class())
}

/// The upstream nameservers of a resolv.conf (`nameserver` lines, port 53).
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split(|c: char| c.is_ascii_whitespace()).filter(|w| !w.is_empty());
            (words.next() == Some("nameserver")).then(|| words.next()).flatten()
        })
        .filter_map(|addr| match addr.parse::<IpAddr>() {
            Ok(ip) => Some(SocketAddr::new(ip, 53)),
            Err(_) => {
                tracing::warn!(nameserver = %addr, "resolv.conf: a nameserver that is not an IP address is skipped");
                None
            }
        })
        .collect()
}

/// Which transport a query came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// When refused names were last logged.
#[derive(Debug)]
struct RefusalLog {
    seen: HashMap<String, Instant>,
    window: Instant,
    lines: u32,
    suppressed: u64,
}

impl RefusalLog {
    fn new() -> Self {
        Self {
            seen: HashMap::new(),
            window: Instant::now(),
            lines: 0,
            suppressed: 0,
        }
    }

    /// Whether to log a refusal of `name` now: once per name per
    /// [`LOG_EVERY`], and at most [`LOG_LINES_PER_WINDOW`] lines per
    /// window. Returns how many were not logged in the window before, when
    /// a new window starts.
    fn admit(&mut self, name: &str, now: Instant) -> (bool, u64) {
        let mut dropped = 0;
        if now.duration_since(self.window) >= LOG_EVERY {
            dropped = std::mem::take(&mut self.suppressed);
            self.window = now;
            self.lines = 0;
        }
        if self.seen.get(name).is_some_and(|t| now.duration_since(*t) < LOG_EVERY) {
            return (false, dropped);
        }
        if self.seen.len() >= LOG_NAMES {
            self.seen.retain(|_, t| now.duration_since(*t) < LOG_EVERY);
        }
        if self.lines >= LOG_LINES_PER_WINDOW || self.seen.len() >= LOG_NAMES {
            self.suppressed += 1;
            return (false, dropped);
        }
        self.lines += 1;
        self.seen.insert(name.to_string(), now);
        (true, dropped)
    }
}

/// The resolver's state, shared by its servers.
#[derive(Debug)]
pub struct Resolver {
    policies: SharedPolicies,
    metrics: Arc<Metrics>,
    upstreams: Vec<SocketAddr>,
    cluster_domain: String,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    refusals: Mutex<RefusalLog>,
}

/// The resolver's bound sockets, ready to serve.
#[derive(Debug)]
pub struct DnsServers {
    resolver: Arc<Resolver>,
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

/// Whether binding `addr` failed because its address family is off (IPv6
/// disabled in the pod): skipped rather than fatal.
fn family_unavailable(addr: &SocketAddr, e: &io::Error) -> bool {
    // EAFNOSUPPORT (97) and EADDRNOTAVAIL (99) on Linux.
    addr.is_ipv6() && (e.kind() == io::ErrorKind::AddrNotAvailable || matches!(e.raw_os_error(), Some(97 | 99)))
}

impl DnsServers {
    /// Bind UDP and TCP on every address of `cfg.listen`. An address whose
    /// family is unavailable is logged and skipped; if none binds, or any
    /// other bind fails, an error.
    pub async fn bind(cfg: DnsConfig, policies: SharedPolicies, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        if cfg.upstreams.is_empty() {
            // Fail closed, not dead: names no policy allows still get
            // NXDOMAIN, and every allowed one SERVFAIL.
            tracing::warn!(
                "the DNS resolver has no upstream (no --dns-upstream, no nameserver line in /etc/resolv.conf): allowed names will get SERVFAIL"
            );
        }
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        let mut skipped = Vec::new();
        for addr in &cfg.listen {
            let u = match UdpSocket::bind(addr).await {
                Ok(u) => u,
                Err(e) if family_unavailable(addr, &e) => {
                    tracing::warn!(%addr, error = %e, "DNS: address not bound (its address family is unavailable); skipped");
                    skipped.push(format!("{addr}: {e}"));
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("binding the DNS resolver's UDP address {addr}")),
            };
            // The TCP listener on the port UDP got (the same when one was given).
            let at = u.local_addr().unwrap_or(*addr);
            let t = TcpListener::bind(at)
                .await
                .with_context(|| format!("binding the DNS resolver's TCP address {at}"))?;
            tracing::info!(addr = %at, "DNS resolver listening (UDP and TCP)");
            udp.push(u);
            tcp.push(t);
        }
        anyhow::ensure!(
            !udp.is_empty(),
            "--dns-listen: none of its addresses could be bound ({})",
            skipped.join("; ")
        );
        let resolver = Arc::new(Resolver {
            policies,
            metrics,
            upstreams: cfg.upstreams,
            cluster_domain: normalize_host(&cfg.cluster_domain),
            timeout: cfg.timeout,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            connections: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
            refusals: Mutex::new(RefusalLog::new()),
        });
        Ok(Self { resolver, udp, tcp })
    }

    /// The UDP addresses bound (the TCP ones are the same).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp.iter().filter_map(|u| u.local_addr().ok()).collect()
    }

    /// Serve until the tasks are aborted.
    pub fn spawn(self, tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>) {
        for sock in self.udp {
            let resolver = self.resolver.clone();
            tasks.spawn(async move { resolver.serve_udp(Arc::new(sock)).await });
        }
        for listener in self.tcp {
            let resolver = self.resolver.clone();
            tasks.spawn(async move { resolver.serve_tcp(listener).await });
        }
    }
}

impl Resolver {
    fn count(&self, result: &'static str) {
        self.metrics.dns_query(result);
    }

    async fn serve_udp(self: Arc<Self>, sock: Arc<UdpSocket>) -> anyhow::Result<()> {
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                // ICMP errors of earlier sends surface here on some systems.
                Err(e) => {
                    tracing::debug!(error = %e, "DNS: UDP receive failed");
                    continue;
                }
            };
            let Some(packet) = buf.get(..n).filter(|p| p.len() <= MAX_QUERY_BYTES).map(<[u8]>::to_vec) else {
                self.count("malformed");
                continue;
            };
            let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                self.count("error");
                tracing::debug!("DNS: too many queries in flight; a UDP query dropped");
                continue;
            };
            let this = self.clone();
            let sock = sock.clone();
            tokio::spawn(async move {
                if let Some(reply) = this.answer(&packet, Transport::Udp).await
                    && let Err(e) = sock.send_to(&reply, peer).await
                {
                    tracing::debug!(error = %e, %peer, "DNS: UDP reply not sent");
                }
                drop(permit);
            });
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) -> anyhow::Result<()> {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS: TCP accept failed");
                    // e.g. out of file descriptors: do not spin.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "DNS: too many TCP connections; one closed");
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                this.connection(stream).await;
                drop(permit);
            });
        }
    }

    /// One TCP connection: length-prefixed queries, answered in turn, until
    /// the client closes, idles, or sends something that is not a query.
    async fn connection(self: Arc<Self>, mut stream: TcpStream) {
        loop {
            let len = match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_u16()).await {
                Ok(Ok(len)) => usize::from(len),
                _ => return,
            };
            if len == 0 || len > MAX_QUERY_BYTES {
                self.count("malformed");
                return;
            }
            let mut packet = vec![0u8; len];
            match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut packet)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let Ok(permit) = tokio::time::timeout(self.timeout, self.in_flight.clone().acquire_owned()).await else {
                self.count("error");
                return;
            };
            let reply = self.answer(&packet, Transport::Tcp).await;
            drop(permit);
            let Some(reply) = reply else { return };
            let Ok(n) = u16::try_from(reply.len()) else { return };
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&n.to_be_bytes());
            framed.extend_from_slice(&reply);
            if !matches!(
                tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.write_all(&framed)).await,
                Ok(Ok(()))
            ) {
                return;
            }
        }
    }

    /// The reply to one packet, or `None` to drop it (UDP) or close (TCP).
    async fn answer(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let Ok(query) = Message::from_vec(packet) else {
            self.count("malformed");
            return None;
        };
        if query.message_type() != MessageType::Query {
            // Never answer an answer.
            self.count("malformed");
            return None;
        }
        let policies = self.policies.load_full();
        let verdict = decide(&query, &policies, &self.cluster_domain);
        drop(policies);
        let reply = match verdict {
            Verdict::Forward => self.forward(&query, transport).await,
            Verdict::NoData => {
                self.refused(&query, "a query type that carries data: no records");
                local_answer(&query, ResponseCode::NoError)
            }
            Verdict::NxDomain => {
                self.refused(&query, "no policy declares the name: NXDOMAIN");
                local_answer(&query, ResponseCode::NXDomain)
            }
            Verdict::Refused => {
                self.refused(&query, "not class IN, or a zone transfer: REFUSED");
                local_answer(&query, ResponseCode::Refused)
            }
            Verdict::FormErr => {
                self.count("malformed");
                local_answer(&query, ResponseCode::FormErr)
            }
            Verdict::NotImp => {
                self.count("malformed");
                local_answer(&query, ResponseCode::NotImp)
            }
        };
        self.encode(&query, &reply, transport)
    }

    /// `reply` on the wire, truncated (TC) when over the client's UDP size.
    fn encode(&self, query: &Message, reply: &Message, transport: Transport) -> Option<Vec<u8>> {
        let bytes = match reply.to_vec() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "DNS: an answer could not be written; SERVFAIL");
                self.count("error");
                return local_answer(query, ResponseCode::ServFail).to_vec().ok();
            }
        };
        let limit = match (transport, query.extensions()) {
            (Transport::Tcp, _) => usize::from(u16::MAX),
            (Transport::Udp, Some(edns)) => usize::from(edns.max_payload().max(512)),
            (Transport::Udp, None) => 512,
        };
        if bytes.len() <= limit {
            Some(bytes)
        } else {
            reply.truncate().to_vec().ok()
        }
    }

    /// Log (rate-limited) and count a query answered here without asking.
    fn refused(&self, query: &Message, why: &'static str) {
        self.count("refused");
        let Some(q) = query.queries().first() else { return };
        let name = q.name().to_ascii().to_ascii_lowercase();
        let (log, dropped) = match self.refusals.lock() {
            Ok(mut r) => r.admit(&name, Instant::now()),
            Err(_) => (false, 0),
        };
        if dropped > 0 {
            tracing::warn!(
                count = dropped,
                "DNS: refused queries not logged in the last minute (rate limit)"
            );
        }
        if log {
            tracing::warn!(name = %name, qtype = %q.query_type(), why, "DNS query refused");
        }
    }

    /// Ask the upstreams; their answer with the client's id and question,
    /// or SERVFAIL.
    async fn forward(&self, query: &Message, transport: Transport) -> Message {
        let Some(q) = query.queries().first() else {
            return local_answer(query, ResponseCode::FormErr);
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut last_error = String::from("no upstream");
        for (i, upstream) in self.upstreams.iter().enumerate() {
            // Each upstream gets an even share of the time left.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let tries_left = u32::try_from(self.upstreams.len().saturating_sub(i))
                .unwrap_or(1)
                .max(1);
            let until = tokio::time::Instant::now() + left / tries_left;
            let id: u16 = rand::random();
            let out = upstream_query(query, q, id, transport == Transport::Udp);
            let result = match out.to_vec() {
                Ok(bytes) => match transport {
                    Transport::Udp => exchange_udp(*upstream, &bytes, id, q, until).await,
                    Transport::Tcp => exchange_tcp(*upstream, &bytes, id, q, until).await,
                },
                Err(e) => Err(io::Error::other(e.to_string())),
            };
            match result {
                Ok(resp) if matches!(resp.response_code(), ResponseCode::ServFail | ResponseCode::Refused) => {
                    last_error = format!("{upstream} answered {}", resp.response_code());
                }
                Ok(mut resp) => {
                    resp.set_id(query.id());
                    resp.take_queries();
                    resp.add_query(q.clone());
                    self.count("forwarded");
                    return resp;
                }
                Err(e) => last_error = format!("{upstream}: {e}"),
            }
        }
        tracing::warn!(name = %q.name(), qtype = %q.query_type(), error = %last_error, "DNS: no upstream answered; SERVFAIL");
        self.count("error");
        local_answer(query, ResponseCode::ServFail)
    }
}

/// A local address to send from: loopback for a loopback upstream (nothing
/// bound beyond it then), any otherwise.
fn source_for(upstream: SocketAddr) -> SocketAddr {
    let ip = match (upstream.ip(), upstream.ip().is_loopback()) {
        (IpAddr::V4(_), true) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        (IpAddr::V4(_), false) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (IpAddr::V6(_), true) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        (IpAddr::V6(_), false) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "no answer in time")
}

/// One query over UDP, from a fresh socket (a random source port); answers
/// that are not to it are ignored.
async fn exchange_udp(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
    q: &Query,
    until: tokio::time::Instant,
) -> io::Result<Message> {
    let sock = UdpSocket::bind(source_for(upstream)).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = tokio::time::timeout_at(until, sock.recv(&mut buf))
            .await
            .map_err(|_| timed_out())??;
        if let Some(resp) = buf.get(..n).and_then(|b| Message::from_vec(b).ok())
            && answers(&resp, id, q)
        {
            return Ok(resp);
        }
    }
}

/// One query over TCP.
async fn exchange_tcp(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
    q: &Query,
    until: tokio::time::Instant,
) -> io::Result<Message> {
    tokio::time::timeout_at(until, async {
        let sock = if upstream.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.bind(source_for(upstream))?;
        let mut stream = sock.connect(upstream).await?;
        let n = u16::try_from(query.len()).map_err(io::Error::other)?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(query);
        stream.write_all(&framed).await?;
        let len = usize::from(stream.read_u16().await?);
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).await?;
        let resp = Message::from_vec(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if answers(&resp, id, q) {
            Ok(resp)
        } else {
            Err(io::Error::new(io::ErrorKind::InvalidData, "an answer to another query"))
        }
    })
    .await
    .map_err(|_| timed_out())?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use mandate_policy::engine::LoadedPolicy;
    use std::str::FromStr;

    fn policies(hosts: &[&str]) -> PolicySet {
        let egress: Vec<_> = hosts
            .iter()
            .map(|h| serde_json::json!({"host": h, "port": 443}))
            .collect();
        let spec = serde_json::from_value(serde_json::json!({
            "modules": [{"name": "authz.rego", "rego": "package mandate.authz\nimport rego.v1\ndefault decision := false\n"}],
            "egress": egress,
        }))
        .unwrap();
        PolicySet {
            policies: vec![LoadedPolicy::compile("p".into(), &spec).unwrap()],
            ..PolicySet::default()
        }
    }

    fn query(name: &str, t: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(7).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m
    }

    fn verdict(set: &PolicySet, name: &str, t: RecordType) -> Verdict {
        decide(&query(name, t), set, "cluster.local")
    }

    #[test]
    fn only_declared_and_cluster_names_are_forwarded() {
        let set = policies(&["api.allowed.example", "*.wild.example"]);
        use RecordType::*;
        for (name, t) in [
            ("api.allowed.example.", A),
            ("API.Allowed.EXAMPLE.", AAAA),
            ("api.allowed.example", HTTPS),
            ("x.wild.example.", SVCB),
            ("a.b.wild.example.", CNAME),
            ("_https._tcp.api.allowed.example.", SRV),
            ("kubernetes.default.svc.cluster.local.", A),
            ("api.allowed.example.agents.svc.cluster.local.", AAAA),
            ("cluster.local.", A),
        ] {
            // SRV's name is not the declared one: under it, it is refused.
            let want = if name.starts_with("_https") {
                Verdict::NxDomain
            } else {
                Verdict::Forward
            };
            assert_eq!(verdict(&set, name, t), want, "{name} {t}");
        }
        for name in [
            "evil.example.",
            "allowed.example.",
            "evilallowed.example.",
            "x.api.allowed.example.",
            "wild.example.",
            "evilwild.example.",
            "api.allowed.example.evil.",
            "cluster.local.evil.",
            "evilcluster.local.",
            // 63 bytes of someone's secret, base32, under a domain of theirs.
            "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpjqwey3emvtgo2djnjvwy3d.evil.example.",
            ".",
        ] {
            assert_eq!(verdict(&set, name, A), Verdict::NxDomain, "{name}");
            assert_eq!(verdict(&set, name, TXT), Verdict::NxDomain, "{name}");
        }
        assert_eq!(
            verdict(&PolicySet::default(), "api.allowed.example.", A),
            Verdict::NxDomain
        );
        assert_eq!(
            verdict(&PolicySet::default(), "db.ns.svc.cluster.local.", A),
            Verdict::Forward
        );
    }

    #[test]
    fn data_carrying_types_get_no_records_and_transfers_are_refused() {
        let set = policies(&["api.allowed.example"]);
        use RecordType::*;
        for t in [TXT, NULL, ANY, MX, PTR, NS, SOA, CAA, RecordType::Unknown(65280)] {
            assert_eq!(verdict(&set, "api.allowed.example.", t), Verdict::NoData, "{t}");
        }
        for t in [AXFR, IXFR] {
            assert_eq!(verdict(&set, "api.allowed.example.", t), Verdict::Refused, "{t}");
        }
    }

    #[test]
    fn labels_with_other_bytes_are_never_compared_as_text() {
        let set = policies(&["*.allowed.example"]);
        // One label "x.allowed" under "example": to_ascii gives x\.allowed.example.
        let name = Name::from_labels(vec![b"x.allowed".as_slice(), b"example".as_slice()]).unwrap();
        let mut m = Message::new();
        m.add_query(Query::query(name.clone(), RecordType::A));
        assert_eq!(decide(&m, &set, "cluster.local"), Verdict::NxDomain);
        assert_eq!(plain_name(&name), None);
        let spaced = Name::from_labels(vec![b"a b".as_slice(), b"allowed".as_slice(), b"example".as_slice()]).unwrap();
        assert_eq!(plain_name(&spaced), None);
        assert_eq!(
            plain_name(&Name::from_str("_X-1.Allowed.example.").unwrap()).as_deref(),
            Some("_x-1.allowed.example")
        );
    }

    #[test]
    fn malformed_queries_are_formerr_notimp_or_refused() {
        let set = policies(&["api.allowed.example"]);
        let mut none = query("api.allowed.example.", RecordType::A);
        none.take_queries();
        assert_eq!(decide(&none, &set, "cluster.local"), Verdict::FormErr);
        let mut two = query("api.allowed.example.", RecordType::A);
        two.add_query(Query::query(
            Name::from_str("api.allowed.example.").unwrap(),
            RecordType::AAAA,
        ));
        assert_eq!(decide(&two, &set, "cluster.local"), Verdict::FormErr);
        let mut update = query("api.allowed.example.", RecordType::A);
        update.set_op_code(OpCode::Update);
        assert_eq!(decide(&update, &set, "cluster.local"), Verdict::NotImp);
        let mut chaos = query("version.bind.", RecordType::TXT);
        chaos.queries_mut()[0].set_query_class(DNSClass::CH);
        assert_eq!(decide(&chaos, &set, "cluster.local"), Verdict::Refused);
    }

    #[test]
    fn the_cluster_domain_is_normalized_and_can_be_another() {
        let set = PolicySet::default();
        let q = query("db.ns.svc.corp.internal.", RecordType::A);
        assert_eq!(decide(&q, &set, "Corp.Internal."), Verdict::Forward);
        assert_eq!(decide(&q, &set, "cluster.local"), Verdict::NxDomain);
        assert_eq!(decide(&q, &set, ""), Verdict::NxDomain);
    }

    #[test]
    fn local_answers_carry_the_id_question_and_no_records() {
        let mut q = query("evil.example.", RecordType::A);
        q.set_edns(Edns::new());
        let a = Message::from_vec(&local_answer(&q, ResponseCode::NXDomain).to_vec().unwrap()).unwrap();
        assert_eq!(a.id(), 7);
        assert_eq!(a.message_type(), MessageType::Response);
        assert_eq!(a.response_code(), ResponseCode::NXDomain);
        assert!(a.authoritative() && a.recursion_available() && a.recursion_desired());
        assert_eq!(a.queries(), q.queries());
        assert!(a.answers().is_empty() && a.name_servers().is_empty());
        assert!(a.extensions().is_some());
    }

    #[test]
    fn the_upstream_query_is_rebuilt_lower_case_without_edns_options() {
        let mut q = query("API.Allowed.Example.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(4096).set_dnssec_ok(true);
        q.set_edns(edns);
        let out = upstream_query(&q, &q.queries()[0], 99, true);
        assert_eq!(out.id(), 99);
        assert_eq!(out.queries()[0].name().to_ascii(), "api.allowed.example.");
        let e = out.extensions().as_ref().unwrap();
        assert_eq!(e.max_payload(), UDP_PAYLOAD);
        assert!(e.flags().dnssec_ok);
        let mut resp = out.clone();
        resp.set_message_type(MessageType::Response);
        assert!(answers(&resp, 99, &q.queries()[0]));
        assert!(!answers(&resp, 98, &q.queries()[0]));
        assert!(!answers(&out, 99, &q.queries()[0]), "a query is no answer");
    }

    #[test]
    fn resolv_conf_nameservers_are_read_on_port_53() {
        let text = "# generated\nsearch ns.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver\tfd00::a # v6\nnameserver not-an-ip\noptions ndots:5\n";
        assert_eq!(
            resolv_conf_nameservers(text),
            vec![
                SocketAddr::from(([10, 96, 0, 10], 53)),
                SocketAddr::new("fd00::a".parse().unwrap(), 53)
            ]
        );
    }

    #[test]
    fn refusals_are_logged_once_per_name_and_window() {
        let mut log = RefusalLog::new();
        let t0 = Instant::now();
        assert_eq!(log.admit("a", t0), (true, 0));
        assert_eq!(log.admit("a", t0 + Duration::from_secs(1)), (false, 0));
        for i in 1..LOG_LINES_PER_WINDOW {
            assert!(log.admit(&format!("n{i}"), t0).0);
        }
        assert_eq!(log.admit("one-too-many", t0), (false, 0));
        let later = t0 + LOG_EVERY;
        assert_eq!(log.admit("a", later), (true, 1), "a new window; one was not logged");
    }
}
