//! Unit tests of `selector`: matching, YAML shape, and Kubernetes' key, value and
//! operator rules. Pure computation like the module: they never do I/O.

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn attrs(pairs: &[(&str, &str)]) -> Attrs {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: attrs(pairs),
        match_expressions: Vec::new(),
    }
}

fn expr(key: &str, operator: &str, values: &[&str]) -> LabelSelector {
    LabelSelector {
        match_labels: BTreeMap::new(),
        match_expressions: vec![Requirement {
            key: key.into(),
            operator: operator.into(),
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        }],
    }
}

fn yaml(text: &str) -> Result<LabelSelector, serde_yaml_ng::Error> {
    serde_yaml_ng::from_str(text)
}

fn error_of(s: &LabelSelector) -> String {
    match s.validate() {
        Ok(()) => String::new(),
        Err(Error::Invalid(m)) => m,
    }
}

#[test]
fn empty_selector_matches_everything() {
    let s = LabelSelector::default();
    assert!(s.is_empty());
    assert_eq!(s.validate(), Ok(()));
    assert!(s.matches(&Attrs::new()));
    assert!(s.matches(&attrs(&[("a", "b")])));
}

#[test]
fn empty_yaml_selector_is_empty() -> TestResult {
    let s = yaml("{}")?;
    assert!(s.is_empty());
    assert!(s.matches(&Attrs::new()));
    let s = yaml("matchLabels: {}\nmatchExpressions: []")?;
    assert!(s.is_empty());
    Ok(())
}

#[test]
fn unknown_yaml_field_is_refused() {
    assert!(yaml("matchLabel: {a: b}").is_err());
    assert!(yaml("matchExpressions: [{key: a, operator: Exists, value: [x]}]").is_err());
}

#[test]
fn match_labels_need_every_pair() {
    let s = labels(&[("app", "web"), ("tier", "front")]);
    assert!(s.matches(&attrs(&[("app", "web"), ("tier", "front"), ("x", "y")])));
    assert!(!s.matches(&attrs(&[("app", "web")])));
    assert!(!s.matches(&attrs(&[("app", "web"), ("tier", "back")])));
    assert!(!s.matches(&Attrs::new()));
}

#[test]
fn empty_label_value_needs_the_key() {
    let s = labels(&[("app", "")]);
    assert_eq!(s.validate(), Ok(()));
    assert!(s.matches(&attrs(&[("app", "")])));
    assert!(!s.matches(&Attrs::new()));
    assert!(!s.matches(&attrs(&[("app", "x")])));
}

#[test]
fn in_needs_key_and_value_in_set() {
    let s = expr("env", "In", &["prod", "staging"]);
    assert!(s.matches(&attrs(&[("env", "prod")])));
    assert!(s.matches(&attrs(&[("env", "staging")])));
    assert!(!s.matches(&attrs(&[("env", "dev")])));
    assert!(!s.matches(&Attrs::new()));
}

#[test]
fn not_in_matches_absent_key() {
    let s = expr("env", "NotIn", &["prod"]);
    assert!(s.matches(&Attrs::new()));
    assert!(s.matches(&attrs(&[("other", "prod")])));
    assert!(s.matches(&attrs(&[("env", "dev")])));
    assert!(!s.matches(&attrs(&[("env", "prod")])));
}

#[test]
fn exists_and_does_not_exist() {
    let exists = expr("env", "Exists", &[]);
    let absent = expr("env", "DoesNotExist", &[]);
    for a in [attrs(&[("env", "")]), attrs(&[("env", "prod")])] {
        assert!(exists.matches(&a));
        assert!(!absent.matches(&a));
    }
    for a in [Attrs::new(), attrs(&[("envx", "prod")])] {
        assert!(!exists.matches(&a));
        assert!(absent.matches(&a));
    }
}

#[test]
fn labels_and_expressions_are_anded() -> TestResult {
    let s = yaml(
        "matchLabels: {app: web}\n\
             matchExpressions:\n\
             - {key: env, operator: In, values: [prod]}\n\
             - {key: debug, operator: DoesNotExist}\n",
    )?;
    assert_eq!(s.validate(), Ok(()));
    assert!(s.matches(&attrs(&[("app", "web"), ("env", "prod")])));
    assert!(!s.matches(&attrs(&[("app", "web"), ("env", "prod"), ("debug", "1")])));
    assert!(!s.matches(&attrs(&[("app", "web"), ("env", "dev")])));
    assert!(!s.matches(&attrs(&[("app", "db"), ("env", "prod")])));
    assert!(!s.matches(&Attrs::new()));
    Ok(())
}

#[test]
fn clusterlink_attribute_keys_are_valid() {
    for key in [
        "peer.clusterlink.net/name",
        "peer.clusterlink.net/labels.region",
        "client.clusterlink.net/service-account",
        "client.clusterlink.net/labels.app.kubernetes.io_name",
        "export.clusterlink.net/namespace",
    ] {
        assert_eq!(labels(&[(key, "v")]).validate(), Ok(()), "{key}");
        assert_eq!(expr(key, "Exists", &[]).validate(), Ok(()), "{key}");
    }
}

#[test]
fn valid_keys() {
    let name63 = "a".repeat(63);
    // A 253-character prefix with labels longer than 63: Kubernetes allows it.
    let prefix253 = format!("{}.{}", "b".repeat(100), "c".repeat(152));
    let long = format!("{prefix253}/{name63}");
    for key in [
        "a",
        "A",
        "9",
        "MyName",
        "my.name",
        "123-abc",
        "a_b",
        "a-._b",
        "example.com/MyName",
        "a/b",
        "1-2.x/Y",
        name63.as_str(),
        long.as_str(),
    ] {
        assert_eq!(labels(&[(key, "")]).validate(), Ok(()), "{key}");
    }
}

#[test]
fn invalid_keys() {
    let name64 = "a".repeat(64);
    let prefix254 = format!("{}.{}", "b".repeat(100), "c".repeat(153));
    let long_prefix = format!("{prefix254}/a");
    for key in [
        "",
        "/",
        "/a",
        "a/",
        "a/b/c",
        "-a",
        "a-",
        "_a",
        "a.",
        ".a",
        "this is not a key",
        "a!b",
        "é",
        name64.as_str(),
        "Example.com/a",
        "exa_mple.com/a",
        "-example.com/a",
        "example.com-/a",
        "example..com/a",
        ".example.com/a",
        long_prefix.as_str(),
    ] {
        let m = error_of(&labels(&[(key, "v")]));
        assert!(m.contains(&format!("key {key:?}")), "{key:?}: {m}");
        let m = error_of(&expr(key, "Exists", &[]));
        assert!(m.contains(&format!("key {key:?}")), "{key:?}: {m}");
    }
}

#[test]
fn label_values() {
    let v63 = "v".repeat(63);
    for value in ["", "a", "A-b_c.d", "0", v63.as_str()] {
        assert_eq!(labels(&[("k", value)]).validate(), Ok(()), "{value:?}");
        assert_eq!(expr("k", "In", &[value]).validate(), Ok(()), "{value:?}");
        assert_eq!(
            expr("k", "NotIn", &["ok", value]).validate(),
            Ok(()),
            "{value:?}"
        );
    }
    let v64 = "v".repeat(64);
    for value in [
        "-a",
        "a-",
        ".",
        "_",
        "a b",
        "This val is bad!@#$%^",
        "a/b",
        v64.as_str(),
    ] {
        let m = error_of(&labels(&[("k", value)]));
        assert!(
            m.contains(&format!("value {value:?}")) && m.contains("key \"k\""),
            "{m}"
        );
        let m = error_of(&expr("k", "In", &["ok", value]));
        assert!(
            m.contains(&format!("value {value:?}")) && m.contains("values[1]"),
            "{m}"
        );
    }
}

#[test]
fn operators_are_case_sensitive_and_closed() {
    for op in [
        "in", "notin", "exists", "IN", "Gt", "Lt", "=", "==", "!=", "",
    ] {
        let m = error_of(&expr("k", op, &["v"]));
        assert!(
            m.contains(&format!("{op:?} is not a valid label selector operator")),
            "{m}"
        );
        let m = error_of(&expr("k", op, &[]));
        assert!(m.contains("not a valid label selector operator"), "{m}");
    }
}

#[test]
fn set_operators_need_values() {
    for op in ["In", "NotIn"] {
        let m = error_of(&expr("k", op, &[]));
        assert!(
            m.contains("non-empty") && m.contains(op) && m.contains("\"k\""),
            "{m}"
        );
    }
}

#[test]
fn existence_operators_refuse_values() {
    for op in ["Exists", "DoesNotExist"] {
        let m = error_of(&expr("k", op, &["v"]));
        assert!(
            m.contains("must be empty") && m.contains(op) && m.contains("\"k\""),
            "{m}"
        );
    }
}

#[test]
fn first_bad_expression_is_named() -> TestResult {
    let s = yaml(
        "matchExpressions:\n\
             - {key: a, operator: Exists}\n\
             - {key: b, operator: Bogus, values: [x]}\n",
    )?;
    let m = error_of(&s);
    assert!(m.starts_with("matchExpressions[1]: \"Bogus\""), "{m}");
    Ok(())
}

#[test]
fn invalid_selectors_still_match_predictably() {
    // Not reachable after validation, but must never panic.
    assert!(!expr("k", "Bogus", &[]).matches(&attrs(&[("k", "v")])));
    assert!(!expr("k", "In", &[]).matches(&attrs(&[("k", "v")])));
    assert!(expr("k", "NotIn", &[]).matches(&attrs(&[("k", "v")])));
}
