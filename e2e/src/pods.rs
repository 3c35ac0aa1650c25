//! Checks on pods, for [`crate::wait_until`] and failure reports.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use crate::Check;

/// Waiting reasons after which a container will not start without a change.
/// (`CreateContainerConfigError` is not one: a pod created before its
/// ConfigMap or Secret starts once they exist.)
const HOPELESS: &[&str] = &[
    "ErrImageNeverPull",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerError",
    "CrashLoopBackOff",
    "RunContainerError",
];

fn statuses(pod: &Pod) -> impl Iterator<Item = &ContainerStatus> {
    let status = pod.status.as_ref();
    let init = status
        .and_then(|s| s.init_container_statuses.as_deref())
        .unwrap_or_default();
    let main = status.and_then(|s| s.container_statuses.as_deref()).unwrap_or_default();
    init.iter().chain(main.iter())
}

/// One line per container: name, ready, restarts and state.
pub fn describe(pod: &Pod) -> String {
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "<none>".into());
    let mut out = format!("phase {phase}");
    for cs in statuses(pod) {
        let state = match cs.state.as_ref() {
            Some(s) if s.running.is_some() => "running".to_string(),
            Some(s) if s.waiting.is_some() => {
                let w = s.waiting.as_ref();
                format!(
                    "waiting ({}: {})",
                    w.and_then(|w| w.reason.clone()).unwrap_or_default(),
                    w.and_then(|w| w.message.clone()).unwrap_or_default()
                )
            }
            Some(s) if s.terminated.is_some() => {
                let t = s.terminated.as_ref();
                format!(
                    "terminated (exit {}, {})",
                    t.map(|t| t.exit_code).unwrap_or_default(),
                    t.and_then(|t| t.reason.clone()).unwrap_or_default()
                )
            }
            _ => "unknown".to_string(),
        };
        out.push_str(&format!(
            "; {}: ready={} restarts={} {state}",
            cs.name, cs.ready, cs.restart_count
        ));
    }
    out
}

/// A container stuck for good, if any: `name: reason: message`.
fn hopeless(pod: &Pod) -> Option<String> {
    statuses(pod).find_map(|cs| {
        let w = cs.state.as_ref()?.waiting.as_ref()?;
        let reason = w.reason.as_deref()?;
        HOPELESS.contains(&reason).then(|| {
            format!(
                "container {}: {reason}: {}",
                cs.name,
                w.message.clone().unwrap_or_default()
            )
        })
    })
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

/// Running with every container ready; fails fast on a pod that cannot get there.
pub fn ready(pod: Option<&Pod>) -> Check {
    let Some(pod) = pod else {
        return Check::Pending("the pod does not exist".into());
    };
    if let Some(reason) = hopeless(pod) {
        return Check::Failed(reason);
    }
    match phase(pod) {
        Some("Failed") | Some("Succeeded") => {
            return Check::Failed(format!("the pod ended: {}", describe(pod)));
        }
        Some("Running") => {}
        _ => return Check::Pending(describe(pod)),
    }
    let all_ready = statuses(pod).all(|cs| cs.ready) && statuses(pod).next().is_some();
    if all_ready {
        Check::Done
    } else {
        Check::Pending(describe(pod))
    }
}

/// Ended, successfully or not: the caller reads its logs either way.
pub fn finished(pod: Option<&Pod>) -> Check {
    let Some(pod) = pod else {
        return Check::Pending("the pod does not exist".into());
    };
    if let Some(reason) = hopeless(pod) {
        return Check::Failed(reason);
    }
    match phase(pod) {
        Some("Succeeded") | Some("Failed") => Check::Done,
        _ => Check::Pending(describe(pod)),
    }
}

/// Whether a finished pod succeeded.
pub fn succeeded(pod: &Pod) -> bool {
    phase(pod) == Some("Succeeded")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "status": status})).unwrap()
    }

    #[test]
    fn ready_needs_running_and_every_container_ready() {
        assert!(matches!(ready(None), Check::Pending(_)));
        assert!(matches!(
            ready(Some(&pod(json!({"phase": "Pending"})))),
            Check::Pending(_)
        ));
        let half = pod(json!({"phase": "Running", "containerStatuses": [
            {"name": "a", "ready": true, "restartCount": 0, "image": "i", "imageID": "", "state": {"running": {}}},
            {"name": "b", "ready": false, "restartCount": 0, "image": "i", "imageID": "", "state": {"running": {}}}]}));
        assert!(matches!(ready(Some(&half)), Check::Pending(_)));
        let all = pod(json!({"phase": "Running", "containerStatuses": [
            {"name": "a", "ready": true, "restartCount": 0, "image": "i", "imageID": "", "state": {"running": {}}}]}));
        assert_eq!(ready(Some(&all)), Check::Done);
    }

    #[test]
    fn a_missing_image_fails_fast_with_the_reason() {
        let p = pod(json!({"phase": "Pending", "containerStatuses": [
            {"name": "a", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
             "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "image not present"}}}]}));
        match ready(Some(&p)) {
            Check::Failed(r) => assert!(
                r.contains("ErrImageNeverPull") && r.contains("image not present"),
                "{r}"
            ),
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn finished_accepts_both_endings() {
        assert_eq!(finished(Some(&pod(json!({"phase": "Succeeded"})))), Check::Done);
        assert_eq!(finished(Some(&pod(json!({"phase": "Failed"})))), Check::Done);
        assert!(matches!(
            finished(Some(&pod(json!({"phase": "Running"})))),
            Check::Pending(_)
        ));
        assert!(succeeded(&pod(json!({"phase": "Succeeded"}))));
        assert!(!succeeded(&pod(json!({"phase": "Failed"}))));
    }
}
