//! The names Counterweight shares with Kubernetes objects and with operators.
//!
//! They are fixed by the design notes and appear in manifests, labels and
//! documentation, so they live in one place and are never spelled twice.

/// Namespace label that opts a namespace into init-gate injection.
pub const INJECT_LABEL: &str = "counterweight.dev/inject";
/// Value of [`INJECT_LABEL`] (and of the pod opt-out annotation's opposite) that enables injection.
pub const INJECT_ENABLED: &str = "enabled";
/// Pod annotation with which a pod opts out of injection (value `disabled`).
pub const INJECT_ANNOTATION: &str = "counterweight.dev/inject";
/// Value of [`INJECT_ANNOTATION`] that opts a pod out.
pub const INJECT_DISABLED: &str = "disabled";
/// Pod label naming the pod's role: `service` (the default) or a synchronization role.
pub const ROLE_LABEL: &str = "counterweight.dev/role";
/// Pod annotation marking that the init-gate was injected.
pub const STATUS_ANNOTATION: &str = "counterweight.dev/status";
/// Pod readiness-gate condition type the controller sets while its cluster serves.
pub const SERVING_CONDITION: &str = "counterweight.dev/serving";
/// Namespace the controller, the webhook and the state live in.
pub const SYSTEM_NAMESPACE: &str = "counterweight-system";
/// ConfigMap holding a cluster's active/standby state.
pub const STATE_CONFIGMAP: &str = "counterweight-state";
/// ConfigMap holding the health policy.
pub const POLICY_CONFIGMAP: &str = "counterweight-policy";
/// Key under which the policy YAML is stored in [`POLICY_CONFIGMAP`].
pub const POLICY_KEY: &str = "policy.yaml";

/// Name of the Role, in the controller's namespace, that lets the init-gate
/// read the state ConfigMap. The controller keeps it (and one RoleBinding per
/// opted-in namespace, [`gate_binding_name`]); the Kustomize base holds it
/// too, so that a gate can start before the controller has run.
pub const GATE_ROLE: &str = "counterweight-gate";

/// The RoleBinding that grants the service accounts of namespace `ns` the
/// [`GATE_ROLE`]: `counterweight-gate-<ns>`, in the controller's namespace.
pub fn gate_binding_name(ns: &str) -> String {
    format!("{GATE_ROLE}-{ns}")
}

/// The namespace a [`gate_binding_name`] grants, or `None` for any other
/// name.
pub fn gate_binding_namespace(name: &str) -> Option<&str> {
    name.strip_prefix(GATE_ROLE)?
        .strip_prefix('-')
        .filter(|ns| !ns.is_empty())
}

/// Checks that `s` is a DNS-1123 label (lowercase letters, digits and '-',
/// starting and ending with a letter or digit, at most 63 characters), as
/// Kubernetes requires of namespace names; the reason otherwise.
pub fn check_dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a DNS label (lowercase letters, digits and '-', at most 63)"
        ))
    }
}

/// Checks a cluster's (or the witness's) name: a DNS-1123 label, the one
/// rule for every place a cluster is named. The HA configuration
/// (`HaConfig::validate`) refuses other names, so that every member is one
/// `cwctl switchover --to` can name, a kubeconfig context and a certificate
/// SAN can carry, and the serving lease file (one line, split at spaces)
/// can hold; the command request and the serving lease refuse them too.
pub fn check_cluster_name(s: &str) -> Result<(), String> {
    check_dns_label(s).map_err(|e| format!("cluster name {e}"))
}

/// Checks a Kubernetes label key: an optional prefix (a DNS-1123
/// subdomain of at most 253 characters) and `/`, then a name of 1 to 63
/// characters, letters, digits, '-', '_' and '.', starting and ending with
/// a letter or digit. The API server refuses any other key on an object,
/// so a selector naming one would never match a pod.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let name_ok = is_label_name(name);
    let prefix_ok = prefix
        .is_none_or(|p| p.len() <= 253 && p.split('.').all(|label| check_dns_label(label).is_ok()));
    if name_ok && prefix_ok {
        Ok(())
    } else {
        Err(format!(
            "{key:?} is not a label key: an optional DNS subdomain prefix and '/', then 1 to 63 \
             letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ))
    }
}

/// Kubernetes' rule for a label key's name part, which a non-empty label
/// value follows too: 1 to 63 letters, digits, '-', '_' and '.', starting
/// and ending with a letter or digit.
fn is_label_name(s: &str) -> bool {
    let alnum = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && alnum(s.as_bytes().first())
        && alnum(s.as_bytes().last())
}

/// Checks a Kubernetes label value: empty, or 1 to 63 letters, digits,
/// '-', '_' and '.', starting and ending with a letter or digit. No pod can
/// carry another value, so a selector asking for one would never match.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a label value: empty, or 1 to 63 letters, digits, '-', '_' or '.', \
             starting and ending with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_binding_names_read_back() {
        assert_eq!(gate_binding_name("ems"), "counterweight-gate-ems");
        assert_eq!(
            gate_binding_namespace("counterweight-gate-ems"),
            Some("ems")
        );
        for other in [
            "counterweight-gate",
            "counterweight-gate-",
            "counterweight-gates-x",
            "x",
        ] {
            assert_eq!(gate_binding_namespace(other), None, "{other}");
        }
    }

    #[test]
    fn label_values_follow_kubernetes() {
        for ok in ["", "web", "v1.2_3-x", "A", &"v".repeat(63)] {
            assert_eq!(check_label_value(ok), Ok(()), "{ok}");
        }
        for bad in [
            "-web",
            "web-",
            ".x",
            "a b",
            "a/b",
            "web!",
            "é",
            &"v".repeat(64),
        ] {
            let e = check_label_value(bad).unwrap_err();
            assert!(e.contains("is not a label value"), "{bad}: {e}");
        }
    }

    #[test]
    fn cluster_names_are_dns_labels() {
        for ok in ["east", "west-2", "c0", &"a".repeat(63)] {
            assert_eq!(check_cluster_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "East",
            "west.example",
            "-a",
            "a-",
            "a b",
            "a_b",
            &"a".repeat(64),
        ] {
            let e = check_cluster_name(bad).unwrap_err();
            assert!(e.contains("not a DNS label"), "{bad}: {e}");
        }
    }

    #[test]
    fn label_keys_follow_kubernetes() {
        for ok in [
            "app",
            "App_1.x",
            "app.kubernetes.io/name",
            "counterweight.dev/role",
            "example.com/a",
            &"k".repeat(63),
        ] {
            assert_eq!(check_label_key(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "/app",
            "app/",
            "-app",
            "app-",
            "a b",
            "ap'#b",
            "Example.com/app",
            "a/b/c",
            &"k".repeat(64),
            &format!("{}/app", "p".repeat(254)),
        ] {
            let e = check_label_key(bad).unwrap_err();
            assert!(e.contains("is not a label key"), "{bad}: {e}");
        }
    }
}
