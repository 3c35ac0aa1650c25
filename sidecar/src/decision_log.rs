//! The decision log: one JSON object per line, hash-chained.
//!
//! Each record carries `prev_hash` (the previous record's `hash`) and `hash`
//! = sha256 over `prev_hash`, a newline, and the record serialized without
//! `hash` (keys sorted). Removing, reordering or editing a line breaks the
//! chain at that line; [`verify`] says where. A process starts a new chain
//! from [`GENESIS`], recorded as `"seq": 0`.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// `prev_hash` of the first record a process writes.
pub const GENESIS: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// Headers never written to the log as they are.
pub const ALWAYS_REDACTED: &[&str] = &["authorization", "cookie", "proxy-authorization", "set-cookie"];

/// Writes records to a sink (stdout in production), chaining them.
pub struct DecisionLog {
    inner: Mutex<Chain>,
    redact: Vec<String>,
}

struct Chain {
    out: Box<dyn Write + Send>,
    prev: String,
    seq: u64,
}

impl std::fmt::Debug for DecisionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionLog").field("redact", &self.redact).finish()
    }
}

impl DecisionLog {
    /// `extra_redacted`: more header names to redact (case-insensitive).
    pub fn new(out: Box<dyn Write + Send>, extra_redacted: &[String]) -> Self {
        let mut redact: Vec<String> = ALWAYS_REDACTED.iter().map(|s| s.to_string()).collect();
        redact.extend(extra_redacted.iter().map(|h| h.to_ascii_lowercase()));
        Self {
            inner: Mutex::new(Chain {
                out,
                prev: GENESIS.into(),
                seq: 0,
            }),
            redact,
        }
    }

    /// Headers as they may be logged.
    pub fn redact_headers<'a>(
        &self,
        headers: impl Iterator<Item = (&'a String, &'a String)>,
    ) -> BTreeMap<String, String> {
        headers
            .map(|(k, v)| {
                let lower = k.to_ascii_lowercase();
                let v = if self.redact.contains(&lower) {
                    "[REDACTED]".to_string()
                } else {
                    v.clone()
                };
                (lower, v)
            })
            .collect()
    }

    /// Chain and write `record` (an object without `seq`, `prev_hash`, `hash`).
    /// A write failure is returned: the caller denies, since an action that
    /// cannot be recorded must not happen.
    pub fn write(&self, mut record: serde_json::Map<String, Value>) -> std::io::Result<()> {
        let mut chain = self
            .inner
            .lock()
            .map_err(|_| std::io::Error::other("decision log lock poisoned"))?;
        record.insert("seq".into(), json!(chain.seq));
        record.insert("prev_hash".into(), json!(chain.prev));
        // Serialized once (keys sorted): hashed as is, then written with the
        // hash appended as the last key. Verifiers re-serialize without it.
        let mut line = Value::Object(record).to_string();
        let hash = hash_str(&chain.prev, &line);
        line.pop(); // the closing brace
        line.push_str(",\"hash\":\"");
        line.push_str(&hash);
        line.push_str("\"}\n");
        chain.out.write_all(line.as_bytes())?;
        chain.out.flush()?;
        chain.prev = hash;
        chain.seq += 1;
        Ok(())
    }
}

fn hash_of(prev: &str, body: &Value) -> String {
    hash_str(prev, &body.to_string())
}

fn hash_str(prev: &str, body: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(body.as_bytes());
    format!("sha256:{:x}", h.finalize())
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: usize,
    /// Chains started (process starts).
    pub chains: usize,
}

/// Check a log's hash chain. Lines that are not JSON objects with a `hash`
/// (other output interleaved on stdout) are skipped. The error names the
/// first line that breaks the chain.
pub fn verify(text: &str) -> Result<Verified, String> {
    let mut prev: Option<String> = None;
    let mut next_seq = 0u64;
    let (mut records, mut chains) = (0usize, 0usize);
    for (n, line) in text.lines().enumerate() {
        let lineno = n + 1;
        let Ok(Value::Object(mut rec)) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(Value::String(hash)) = rec.remove("hash") else {
            continue;
        };
        let claimed_prev = rec
            .get("prev_hash")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let seq = rec
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or(format!("line {lineno}: no seq"))?;
        if seq == 0 {
            if claimed_prev != GENESIS {
                return Err(format!(
                    "line {lineno}: a chain start whose prev_hash is not the genesis hash"
                ));
            }
            chains += 1;
        } else {
            match &prev {
                Some(p) if *p == claimed_prev && seq == next_seq => {}
                Some(_) => {
                    return Err(format!(
                        "line {lineno}: the chain breaks here (record {seq} does not follow the line before it): a record was removed, reordered or edited"
                    ));
                }
                None => {
                    return Err(format!(
                        "line {lineno}: the log starts in the middle of a chain (seq {seq})"
                    ));
                }
            }
        }
        let expect = hash_of(&claimed_prev, &Value::Object(rec));
        if expect != hash {
            return Err(format!(
                "line {lineno}: the record was edited (its hash does not match its content)"
            ));
        }
        prev = Some(hash);
        next_seq = seq + 1;
        records += 1;
    }
    Ok(Verified { records, chains })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log_of(n: usize) -> String {
        let buf = Buf::default();
        let log = DecisionLog::new(Box::new(buf.clone()), &[]);
        for i in 0..n {
            let mut rec = serde_json::Map::new();
            rec.insert("decision_id".into(), json!(format!("d{i}")));
            rec.insert("result".into(), json!(if i % 2 == 0 { "allow" } else { "deny" }));
            log.write(rec).unwrap();
        }
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn an_intact_log_verifies() {
        let text = log_of(5);
        assert_eq!(verify(&text), Ok(Verified { records: 5, chains: 1 }));
        // Two process runs appended: two chains.
        let two = format!("{}{}", log_of(2), log_of(3));
        assert_eq!(verify(&two), Ok(Verified { records: 5, chains: 2 }));
    }

    #[test]
    fn removing_editing_or_reordering_a_line_is_detected() {
        let text = log_of(5);
        let lines: Vec<&str> = text.lines().collect();
        let removed = [&lines[..2], &lines[3..]].concat().join("\n");
        assert!(
            verify(&removed).unwrap_err().contains("line 3"),
            "{:?}",
            verify(&removed)
        );
        let edited = text.replacen("\"deny\"", "\"allow\"", 1);
        assert!(verify(&edited).unwrap_err().contains("edited"), "{:?}", verify(&edited));
        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        assert!(verify(&swapped.join("\n")).is_err());
    }

    #[test]
    fn secrets_are_redacted() {
        let log = DecisionLog::new(Box::new(Buf::default()), &["X-Api-Key".into()]);
        let h: BTreeMap<String, String> = [
            ("Authorization", "Bearer s3cret"),
            ("x-api-key", "k"),
            ("accept", "*/*"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let out = log.redact_headers(h.iter());
        assert_eq!(out["authorization"], "[REDACTED]");
        assert_eq!(out["x-api-key"], "[REDACTED]");
        assert_eq!(out["accept"], "*/*");
    }
}
