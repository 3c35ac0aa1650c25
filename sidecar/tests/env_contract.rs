//! The injector and the sidecar agree on the sidecar's environment: every
//! name a [`SidecarEnv`] can write is an argument of the sidecar with that
//! env name, and what a [`SidecarEnv`] writes parses, through the sidecar's
//! own [`Args`] reading a real process environment, into the values it
//! stands for.
//!
//! clap reads the environment of the process; the workspace forbids
//! `unsafe` (so no `std::env::set_var`), so each environment is parsed in a
//! child: this test binary re-run with `env_clear()`, exactly the pairs, and
//! [`CHILD`] set, running only [`child_prints_what_it_parsed`], which prints
//! the parsed `Args` after a marker. The parent requires the marker (a child
//! that ran no test cannot pass) and compares with the `Args` expected.

#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)] // test fixtures

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use clap::CommandFactory as _;
use mandate_api::env::{
    BuiltinIdentity, EnvValue, IdentitySource, PodField, SIDECAR_ENV_NAMES, SidecarEnv, SidecarIdentity, SpireIdentity,
};
use mandate_operator::webhook::inject::{AgentRef, InjectConfig, sidecar_env};
use mandate_policy::engine::EngineKind;
use mandate_sidecar::args::Args;

/// Set (to anything) in the child only.
const CHILD: &str = "MANDATE_ENV_CONTRACT_CHILD";
/// Precedes the child's parsed `Args`.
const MARKER: &str = "env-contract-parsed: ";

/// What the kubelet resolves each pod field to, in these tests.
fn kubelet(field: PodField) -> String {
    let pod = BTreeMap::from([
        ("metadata.namespace", "agents"),
        ("metadata.name", "agent-7f9c"),
        ("spec.serviceAccountName", "agent-sa"),
    ]);
    pod.get(field.path())
        .unwrap_or_else(|| panic!("no such pod field: {}", field.path()))
        .to_string()
}

fn resolve(value: &EnvValue) -> String {
    match value {
        EnvValue::Literal(v) => v.clone(),
        EnvValue::Field(f) => kubelet(*f),
    }
}

/// A sidecar environment with every setting present, and each value unlike
/// the sidecar's default for it (checked below), so a variable the sidecar
/// did not read shows.
fn full(identity: SidecarIdentity) -> SidecarEnv {
    SidecarEnv {
        policy: "/etc/mandate/policies".into(),
        listen_unix: "/var/run/mandate/authz.sock".into(),
        no_tcp: true,
        admin_listen: SocketAddr::from(([0, 0, 0, 0], 15020)),
        eval_timeout_ms: 77,
        max_body_bytes: 4242,
        agent_namespace: EnvValue::Field(PodField::Namespace),
        agent_pod: EnvValue::Field(PodField::Name),
        agent_service_account: EnvValue::Field(PodField::ServiceAccountName),
        agent_identity: Some("researcher".into()),
        identity,
        agent_spiffe_id: Some("spiffe://example.org/ns/agents/agent/researcher".into()),
        dns_listen: Some("127.0.0.1:15053,[::1]:15053".into()),
        dns_cluster_domain: Some("corp.internal".into()),
        interception: Some(("/var/run/mandate/sds.sock".into(), "/var/run/mandate-ca".into())),
    }
}

fn full_builtin() -> SidecarEnv {
    full(SidecarIdentity::Builtin(BuiltinIdentity {
        svid_server: "https://mandate-operator.mandate-system.svc:9444".into(),
        trust_domain: "example.org".into(),
        svid_token_file: "/run/token/t".into(),
        trust_bundle_file: "/run/bundle/b.pem".into(),
        policy_server: Some("https://mandate-operator.mandate-system.svc:9445".into()),
    }))
}

fn full_spire() -> SidecarEnv {
    full(SidecarIdentity::Spire(SpireIdentity {
        spiffe_endpoint_socket: "unix:///spiffe-workload-api/spire-agent.sock".into(),
        trust_domain: "example.org".into(),
        operator_spiffe_id: Some("spiffe://example.org/spire/mandate-operator".into()),
        policy_server: Some("https://mandate-operator.mandate-system.svc:9445".into()),
    }))
}

/// The sidecar's arguments by env name.
fn args_by_env() -> BTreeMap<String, clap::Arg> {
    Args::command()
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_string(), a.clone())))
        .collect()
}

#[test]
fn every_name_the_contract_writes_is_a_sidecar_argument() {
    let args = args_by_env();
    for name in SidecarEnv::NAMES {
        assert!(
            args.contains_key(name),
            "the injector can write {name}, but no argument of the sidecar reads it"
        );
    }
    // NAMES is what pairs() writes: the two full environments write all of it.
    let written: BTreeSet<&str> = [full_builtin(), full_spire()]
        .iter()
        .flat_map(|e| e.pairs().into_iter().map(|(n, _)| n))
        .collect();
    assert_eq!(written, SidecarEnv::NAMES.into_iter().collect::<BTreeSet<_>>());
    // And every variable the sidecar reads is one of the constants.
    let read: BTreeSet<&str> = args.keys().map(String::as_str).collect();
    assert_eq!(read, SIDECAR_ENV_NAMES.into_iter().collect::<BTreeSet<_>>());
}

#[test]
fn the_full_environments_differ_from_every_default() {
    let args = args_by_env();
    for env in [full_builtin(), full_spire()] {
        for (name, value) in env.pairs() {
            let value = resolve(&value);
            let arg = &args[name];
            let defaults: Vec<_> = arg.get_default_values().iter().map(|d| d.to_string_lossy()).collect();
            assert!(
                !defaults.iter().any(|d| *d == value),
                "{name}={value} is the sidecar's default: not reading it would go unnoticed"
            );
        }
    }
}

/// Run the child on exactly `env`'s pairs; the `Args` it parsed, as Debug.
fn parse_in_child(env: &SidecarEnv) -> String {
    let pairs: Vec<(&str, String)> = env.pairs().iter().map(|(n, v)| (*n, resolve(v))).collect();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_prints_what_it_parsed",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_clear()
        .envs(pairs.iter().map(|(n, v)| (n, v)))
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the sidecar's Args refused {pairs:?}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once(MARKER).map(|(_, parsed)| parsed))
        .collect();
    assert_eq!(
        parsed.len(),
        1,
        "the child did not parse (did its test run?):\n{stdout}"
    );
    parsed[0].to_string()
}

/// The child's half: parse the sidecar's arguments from this process's
/// environment alone (no command-line arguments) and print them. Does
/// nothing unless run by [`parse_in_child`].
#[test]
fn child_prints_what_it_parsed() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    match <Args as clap::Parser>::try_parse_from(["mandate-sidecar"]) {
        Ok(args) => println!("{MARKER}{args:?}"),
        Err(e) => panic!("{e}"),
    }
}

/// What the sidecar must have parsed from `env`: each setting where the
/// contract put it, the sidecar's defaults elsewhere.
fn expected(env: &SidecarEnv) -> Args {
    let mut args = Args {
        policies: vec![PathBuf::from(&env.policy)],
        listen: "127.0.0.1:9191".parse().unwrap(),
        listen_unix: Some(PathBuf::from(&env.listen_unix)),
        no_tcp: env.no_tcp,
        engine: EngineKind::Auto,
        admin_listen: env.admin_listen,
        eval_timeout_ms: env.eval_timeout_ms,
        max_body_bytes: usize::try_from(env.max_body_bytes).unwrap(),
        redact_headers: vec![],
        reload_interval_ms: 1000,
        agent_spiffe_id: env.agent_spiffe_id.clone(),
        agent_identity: env.agent_identity.clone(),
        agent_namespace: Some(resolve(&env.agent_namespace)),
        agent_pod: Some(resolve(&env.agent_pod)),
        agent_service_account: Some(resolve(&env.agent_service_account)),
        wait_ready: vec![],
        svid_server: None,
        svid_token_file: "/var/run/secrets/mandate/token".into(),
        trust_bundle_file: "/var/run/mandate-bundle/bundle.pem".into(),
        trust_domain: "cluster.local".into(),
        operator_spiffe_id: None,
        identity_source: IdentitySource::Builtin,
        spiffe_endpoint_socket: None,
        policy_server: None,
        workers: 2,
        wait_timeout_seconds: 120,
        log: "info".into(),
        dns_listen: env
            .dns_listen
            .as_deref()
            .map(|l| l.split(',').map(|a| a.parse().unwrap()).collect())
            .unwrap_or_default(),
        dns_upstream: vec![],
        dns_cluster_domain: env.dns_cluster_domain.clone().unwrap_or_else(|| "cluster.local".into()),
        sds_socket: env.interception.as_ref().map(|(s, _)| PathBuf::from(s)),
        ca_bundle_dir: env.interception.as_ref().map(|(_, d)| PathBuf::from(d)),
        system_roots: "/etc/ssl/certs/ca-certificates.crt".into(),
        ca_lifetime_hours: 720,
        leaf_lifetime_seconds: 86_400,
        max_intercepted_names: 1024,
    };
    match &env.identity {
        SidecarIdentity::None => {}
        SidecarIdentity::Builtin(b) => {
            args.svid_server = Some(b.svid_server.clone());
            args.trust_domain = b.trust_domain.clone();
            args.svid_token_file = PathBuf::from(&b.svid_token_file);
            args.trust_bundle_file = PathBuf::from(&b.trust_bundle_file);
            args.policy_server = b.policy_server.clone();
        }
        SidecarIdentity::Spire(s) => {
            args.identity_source = IdentitySource::Spire;
            args.spiffe_endpoint_socket = Some(s.spiffe_endpoint_socket.clone());
            args.trust_domain = s.trust_domain.clone();
            args.operator_spiffe_id = s.operator_spiffe_id.clone();
            args.policy_server = s.policy_server.clone();
        }
    }
    args
}

fn assert_parses_as_expected(what: &str, env: &SidecarEnv) {
    assert_eq!(
        parse_in_child(env),
        format!("{:?}", expected(env)),
        "{what}: the sidecar read {:?} otherwise",
        env.pairs()
    );
}

#[test]
fn a_full_sidecar_env_parses_into_the_sidecars_args() {
    assert_parses_as_expected("builtin CA", &full_builtin());
    assert_parses_as_expected("SPIRE", &full_spire());
    // A false flag is read as false.
    let mut off = full_builtin();
    off.no_tcp = false;
    assert_parses_as_expected("no_tcp false", &off);
}

#[test]
fn what_the_injector_writes_parses_into_the_sidecars_args() {
    let agent = AgentRef {
        identity: Some("researcher".into()),
        spiffe_id: Some("spiffe://example.org/ns/agents/agent/researcher".into()),
    };
    let svid = Some("https://mandate-operator.mandate-system.svc:9444".to_string());
    let policy = Some("https://mandate-operator.mandate-system.svc:9445".to_string());
    let configs = [
        ("no SVID", InjectConfig::default()),
        (
            "builtin CA",
            InjectConfig {
                svid_server: svid.clone(),
                policy_server: policy.clone(),
                eval_timeout_ms: 20,
                max_request_bytes: 4096,
                sidecar_admin_port: 18000,
                ..InjectConfig::default()
            },
        ),
        (
            "SPIRE",
            InjectConfig {
                identity_source: IdentitySource::Spire,
                svid_server: svid,
                policy_server: policy,
                trust_domain: "example.org".into(),
                operator_spiffe_id: Some("spiffe://example.org/spire/mandate-operator".into()),
                spiffe_socket_dir: "/spiffe/".into(),
                ..InjectConfig::default()
            },
        ),
    ];
    for (what, cfg) in configs {
        for agent in [agent.clone(), AgentRef::default()] {
            assert_parses_as_expected(what, &sidecar_env(&cfg, &agent));
        }
    }
}
