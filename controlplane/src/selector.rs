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
const MAX_PREFIX_LEN: usize = fabric::names::MAX_SUBDOMAIN;

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
        if fabric::names::dns1123_subdomain(prefix).is_err() {
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

#[cfg(test)]
mod tests;
