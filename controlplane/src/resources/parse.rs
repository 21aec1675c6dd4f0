//! Bounded YAML parsing: a multi-document stream into `Resource`s, within fixed limits
//! on bytes, flow nesting and expanded nodes, naming the offending document and field.
//! It checks shape and bounds only and leaves what a resource means to `validate` (run
//! on each document); it never does I/O and never validates semantics itself.

use std::cell::Cell;

use serde::de::{self, DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use serde::Deserialize;
use serde_yaml_ng::value::{Tag, TaggedValue};
use serde_yaml_ng::{Mapping, Value};

use super::validate::validate;
use super::{Error, Key, Kind, Resource, API_VERSION, DEFAULT_NAMESPACE};

/// Largest YAML stream `parse_stream` reads; a larger one is refused whole.
pub const MAX_STREAM_BYTES: usize = 1 << 20;
/// Most `[` and `{` one document may contain. libyaml's scanner walks its whole stack
/// of flow levels for every token, so deep flow nesting is quadratic (400 KB of
/// `{a: ` takes minutes). Counted without regard to quoting, so never below the depth.
pub const MAX_FLOW_OPENERS: usize = 1024;
/// Most YAML nodes a stream may build. Aliases are expanded in full, and serde_yaml_ng
/// only caps alias jumps, not what they copy: 28 KB of `*a` referring to a list of
/// 4000 scalars builds 16 million nodes. An alias-free stream of `MAX_STREAM_BYTES` has
/// at most half as many nodes as bytes.
pub const MAX_STREAM_NODES: usize = 1 << 20;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

fn from_value<T: serde::de::DeserializeOwned>(
    v: serde_yaml_ng::Value,
    doc: usize,
) -> Result<T, Error> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        Error::Parse {
            doc,
            message: if path == "." {
                e.inner().to_string()
            } else {
                format!("{path}: {}", e.inner())
            },
        }
    })
}

/// One document of a YAML stream: its position (from 1), what it names (read
/// leniently, so that a refused document can still be identified), and the result.
#[derive(Debug)]
pub struct Doc {
    pub index: usize,
    pub key: Option<Key>,
    pub result: Result<Resource, Error>,
}

/// A parsed YAML stream. A syntax error ends the stream: the documents after it
/// cannot be trusted, so the caller should treat the whole file as unreadable.
#[derive(Debug, Default)]
pub struct Stream {
    pub docs: Vec<Doc>,
    pub syntax_error: Option<Error>,
}

/// Parses one YAML stream (documents separated by `---`). Empty documents are
/// skipped; each other document is validated on its own.
///
/// Streams over `MAX_STREAM_BYTES`, or with a document over `MAX_FLOW_OPENERS`, are
/// refused whole, and expansion stops at `MAX_STREAM_NODES`: each is a syntax error.
pub fn parse_stream(text: &str) -> Stream {
    let mut out = Stream::default();
    if text.len() > MAX_STREAM_BYTES {
        out.syntax_error = Some(Error::Parse {
            doc: 1,
            message: format!(
                "the stream has {} bytes, more than the {MAX_STREAM_BYTES} accepted",
                text.len()
            ),
        });
        return out;
    }
    if let Some((doc, line)) = too_deep(text) {
        out.syntax_error = Some(Error::Parse {
            doc,
            message: format!(
                "line {line}: more than {MAX_FLOW_OPENERS} '[' or '{{' in one document"
            ),
        });
        return out;
    }
    let budget = Cell::new(MAX_STREAM_NODES);
    for (i, d) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = match Budget(&budget).deserialize(d) {
            Ok(Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                out.syntax_error = Some(Error::Parse {
                    doc: index,
                    message: e.to_string(),
                });
                break;
            }
        };
        // `kubectl get -o yaml` of several objects prints one `kind: List` whose
        // items are the objects: each item counts as a document at this position.
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            match value.get("items").and_then(Value::as_sequence) {
                Some(items) => {
                    for item in items {
                        out.docs.push(Doc {
                            index,
                            key: loose_key(item),
                            result: parse_value(item.clone(), index),
                        });
                    }
                }
                None => out.docs.push(Doc {
                    index,
                    key: None,
                    result: Err(Error::Parse {
                        doc: index,
                        message: "items: a List needs a sequence of items".into(),
                    }),
                }),
            }
            continue;
        }
        out.docs.push(Doc {
            index,
            key: loose_key(&value),
            result: parse_value(value, index),
        });
    }
    out
}

/// The first document with more than `MAX_FLOW_OPENERS` `[` or `{`: its number
/// (best effort) and first line. A line starting with `---` or `...` either closes
/// every flow collection or ends the parse with an error, so the count restarts there.
fn too_deep(text: &str) -> Option<(usize, usize)> {
    let (mut doc, mut open, mut start, mut openers) = (0, false, 1, 0);
    for (i, line) in text.lines().enumerate() {
        let b = line.as_bytes();
        let marker = b.get(3).is_none_or(|c| matches!(c, b' ' | b'\t' | b'\r'));
        let body = line.trim_start();
        if b.starts_with(b"---") && marker {
            (doc, open, start, openers) = (doc + 1, true, i + 1, 0);
        } else if b.starts_with(b"...") && marker {
            (open, start, openers) = (false, i + 1, 0);
        } else if !open && !body.is_empty() && !body.starts_with(['#', '%']) {
            (doc, open) = (doc + 1, true);
        }
        openers += b.iter().filter(|c| matches!(c, b'[' | b'{')).count();
        if openers > MAX_FLOW_OPENERS {
            return Some((doc.max(1), start));
        }
    }
    None
}

/// Builds a `Value` as serde_yaml_ng's own `Deserialize` does, charging one node of
/// the stream's budget per node built, aliases included.
struct Budget<'a>(&'a Cell<usize>);

impl Budget<'_> {
    fn charge<E: de::Error>(&self) -> Result<(), E> {
        match self.0.get().checked_sub(1) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => Err(E::custom(format!(
                "more than {MAX_STREAM_NODES} YAML nodes once aliases are expanded"
            ))),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Budget<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Budget<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Number(i.into()))
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Number(u.into()))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Number(f.into()))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::String(s))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.charge()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Budget(self.0))? {
            out.push(v);
        }
        Ok(Value::Sequence(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.charge()?;
        let mut out = Mapping::new();
        while let Some(k) = map.next_key_seed(Budget(self.0))? {
            if out.contains_key(&k) {
                return Err(de::Error::custom(match &k {
                    Value::Null => "duplicate entry with null key".to_owned(),
                    Value::Bool(b) => format!("duplicate entry with key `{b}`"),
                    Value::Number(n) => format!("duplicate entry with key {n}"),
                    Value::String(s) => format!("duplicate entry with key {s:?}"),
                    _ => "duplicate entry in YAML map".to_owned(),
                }));
            }
            let v = map.next_value_seed(Budget(self.0))?;
            out.insert(k, v);
        }
        Ok(Value::Mapping(out))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        self.charge()?;
        let (tag, contents): (String, _) = data.variant()?;
        if tag.is_empty() {
            return Err(de::Error::custom("empty YAML tag is not allowed"));
        }
        let value = contents.newtype_variant_seed(Budget(self.0))?;
        Ok(Value::Tagged(Box::new(TaggedValue {
            tag: Tag::new(tag),
            value,
        })))
    }
}

/// As `parse_stream`, flattened: every document's result, then the syntax error.
pub fn parse_documents(text: &str) -> Vec<Result<Resource, Error>> {
    let s = parse_stream(text);
    let mut out: Vec<_> = s.docs.into_iter().map(|d| d.result).collect();
    if let Some(e) = s.syntax_error {
        out.push(Err(e));
    }
    out
}

/// One object as the Kubernetes API returns it (JSON), parsed and validated exactly as
/// a document of a YAML file is. `status` and server-set metadata are ignored.
pub fn parse_object(object: &serde_json::Value) -> Result<Resource, Error> {
    let value = serde_yaml_ng::to_value(object).map_err(|e| Error::Parse {
        doc: 1,
        message: e.to_string(),
    })?;
    parse_value(value, 1)
}

/// Kind, namespace and name of a document, read leniently.
fn loose_key(doc: &serde_yaml_ng::Value) -> Option<Key> {
    let kind = Kind::from_user(doc.get("kind")?.as_str()?)?;
    let md = doc.get("metadata")?;
    let name = md.get("name")?.as_str()?.to_owned();
    let namespace = if kind.namespaced() {
        md.get("namespace")
            .and_then(|n| n.as_str())
            .filter(|n| !n.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_owned()
    } else {
        String::new()
    };
    Some(Key {
        kind,
        namespace,
        name,
    })
}

fn parse_value(value: serde_yaml_ng::Value, doc: usize) -> Result<Resource, Error> {
    let head: Head = from_value(value.clone(), doc)?;
    if head.api_version != API_VERSION {
        return Err(Error::Parse {
            doc,
            message: format!(
                "apiVersion: {:?} is not supported (want {API_VERSION:?})",
                head.api_version
            ),
        });
    }
    let r = match head.kind.as_str() {
        "Peer" => Resource::Peer(from_value(value, doc)?),
        "Export" => Resource::Export(from_value(value, doc)?),
        "Import" => Resource::Import(from_value(value, doc)?),
        "AccessPolicy" => Resource::AccessPolicy(from_value(value, doc)?),
        "PrivilegedAccessPolicy" => Resource::PrivilegedAccessPolicy(from_value(value, doc)?),
        other => {
            return Err(Error::Parse {
                doc,
                message: format!(
                    "kind: {other:?} is not one of Peer, Export, Import, AccessPolicy, PrivilegedAccessPolicy"
                ),
            })
        }
    };
    validate(&r)?;
    Ok(r)
}
