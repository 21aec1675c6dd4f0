//! Kubernetes label selectors over attribute maps: `matchLabels` and
//! `matchExpressions` (In, NotIn, Exists, DoesNotExist), with Kubernetes' validation
//! rules for keys and values (`metav1.LabelSelectorAsSelector`). An empty selector
//! matches everything, even an empty attribute map. Pure data: no I/O, no policy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Attributes of a connection's source or destination.
pub type Attrs = BTreeMap<String, String>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// The four `matchExpressions` operators. Kubernetes spells them exactly so
/// (case-sensitive); anything else is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Operator {
    fn parse(s: &str) -> Option<Operator> {
        match s {
            "In" => Some(Operator::In),
            "NotIn" => Some(Operator::NotIn),
            "Exists" => Some(Operator::Exists),
            "DoesNotExist" => Some(Operator::DoesNotExist),
            _ => None,
        }
    }
}

impl LabelSelector {
    /// True when the selector has no labels and no expressions (matches everything).
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Accepts exactly what `metav1.LabelSelectorAsSelector` accepts. The error names
    /// the first offending entry (labels in key order, then expressions in order).
    pub fn validate(&self) -> Result<(), Error> {
        for (key, value) in &self.match_labels {
            check_key(key).map_err(|why| invalid(format!("matchLabels: key {key:?}: {why}")))?;
            check_value(value).map_err(|why| {
                invalid(format!(
                    "matchLabels: value {value:?} of key {key:?}: {why}"
                ))
            })?;
        }
        for (i, req) in self.match_expressions.iter().enumerate() {
            let at = format!("matchExpressions[{i}]");
            // Kubernetes checks the operator before anything else in the requirement.
            let Some(op) = Operator::parse(&req.operator) else {
                return Err(invalid(format!(
                    "{at}: {:?} is not a valid label selector operator (want In, NotIn, Exists or DoesNotExist)",
                    req.operator
                )));
            };
            let key = &req.key;
            check_key(key).map_err(|why| invalid(format!("{at}: key {key:?}: {why}")))?;
            match op {
                Operator::In | Operator::NotIn if req.values.is_empty() => {
                    return Err(invalid(format!(
                        "{at}: key {key:?}: values must be non-empty for operator {}",
                        req.operator
                    )));
                }
                Operator::Exists | Operator::DoesNotExist if !req.values.is_empty() => {
                    return Err(invalid(format!(
                        "{at}: key {key:?}: values must be empty for operator {}",
                        req.operator
                    )));
                }
                _ => {}
            }
            for (j, value) in req.values.iter().enumerate() {
                check_value(value).map_err(|why| {
                    invalid(format!(
                        "{at}.values[{j}]: value {value:?} of key {key:?}: {why}"
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Kubernetes matching: every `matchLabels` pair is present and equal, and every
    /// expression holds (`NotIn` and `DoesNotExist` hold when the key is absent).
    /// Meant for validated selectors; an unknown operator matches nothing.
    pub fn matches(&self, attrs: &Attrs) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| attrs.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(attrs))
    }
}

impl Requirement {
    fn matches(&self, attrs: &Attrs) -> bool {
        let value = attrs.get(&self.key);
        match Operator::parse(&self.operator) {
            Some(Operator::In) => value.is_some_and(|v| self.values.contains(v)),
            Some(Operator::NotIn) => value.is_none_or(|v| !self.values.contains(v)),
            Some(Operator::Exists) => value.is_some(),
            Some(Operator::DoesNotExist) => value.is_none(),
            None => false,
        }
    }
}

fn invalid(message: String) -> Error {
    Error::Invalid(message)
}

/// Longest name part of a qualified name, and longest label value.
const MAX_NAME_LEN: usize = 63;
/// Longest DNS-1123 subdomain (the optional key prefix).
const MAX_PREFIX_LEN: usize = 253;

/// `validation.IsQualifiedName`: `[prefix/]name`, the prefix a DNS-1123 subdomain,
/// the name 1-63 characters of `[A-Za-z0-9-_.]` starting and ending alphanumeric.
fn check_key(key: &str) -> Result<(), String> {
    let mut parts = key.split('/');
    let (prefix, name) =
        match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, _) => (None, name),
            (Some(prefix), Some(name), None) => (Some(prefix), name),
            _ => return Err(
                "a qualified name must be an optional DNS subdomain prefix and '/' followed by \
                 a name (e.g. 'example.com/MyName'); only one '/' is allowed"
                    .into(),
            ),
        };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err("prefix part must be non-empty".into());
        }
        if prefix.len() > MAX_PREFIX_LEN {
            return Err(format!(
                "prefix part must be no more than {MAX_PREFIX_LEN} characters"
            ));
        }
        if !is_dns1123_subdomain(prefix) {
            return Err(
                "prefix part must be a lowercase RFC 1123 subdomain: lower case \
                        alphanumeric characters, '-' or '.', starting and ending with an \
                        alphanumeric character (e.g. 'example.com')"
                    .into(),
            );
        }
    }
    if name.is_empty() {
        return Err("name part must be non-empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name part must be no more than {MAX_NAME_LEN} characters"
        ));
    }
    if !is_label_token(name) {
        return Err(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and \
                    must start and end with an alphanumeric character (e.g. 'MyName', \
                    'my.name', '123-abc')"
                .into(),
        );
    }
    Ok(())
}

/// `validation.IsValidLabelValue`: empty, or 1-63 characters of `[A-Za-z0-9-_.]`
/// starting and ending alphanumeric.
fn check_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_NAME_LEN {
        return Err(format!("must be no more than {MAX_NAME_LEN} characters"));
    }
    if !value.is_empty() && !is_label_token(value) {
        return Err(
            "a valid label value must be an empty string or consist of alphanumeric \
                    characters, '-', '_' or '.', and must start and end with an alphanumeric \
                    character (e.g. 'MyValue', 'my_value', '12345')"
                .into(),
        );
    }
    Ok(())
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, i.e. non-empty.
fn is_label_token(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*`, at most 253
/// characters. Unlike DNS proper, Kubernetes puts no 63-character limit on each label.
fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= MAX_PREFIX_LEN
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
            match (b.first(), b.last()) {
                (Some(first), Some(last)) => {
                    alnum(first) && alnum(last) && b.iter().all(|c| alnum(c) || *c == b'-')
                }
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
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
}
