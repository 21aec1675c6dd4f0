//! The access-token key in the `jwk` Secret of the ClusterLink namespace (data key
//! `key`: the base64 text of 32 random bytes), shared by every replica. Created when
//! absent, regenerated when unparsable (spec §3.4, with ClusterLink's inverted check
//! fixed), and put back with the key in use when deleted; a valid change is loaded by
//! every replica.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{watcher, WatchStreamExt as _};
use tokio::sync::watch;

use super::{Error, Kube};
use crate::core::Core;

pub const SECRET: &str = "jwk";
const DATA_KEY: &str = "key";

/// The key a Secret holds, if it holds a valid one.
fn parse(secret: &Secret) -> Option<Vec<u8>> {
    let text = secret.data.as_ref()?.get(DATA_KEY)?;
    let key = B64.decode(String::from_utf8_lossy(&text.0).trim()).ok()?;
    (key.len() == 32).then_some(key)
}

fn fresh() -> Vec<u8> {
    (0..32).map(|_| rand::random::<u8>()).collect()
}

fn secret(key: &[u8], resource_version: Option<String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(SECRET.into()),
            resource_version,
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            DATA_KEY.to_owned(),
            ByteString(B64.encode(key).into_bytes()),
        )])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// The shared key: read, created when absent (the first replica wins), regenerated
/// when unparsable.
pub async fn ensure(kube: &Kube) -> Result<Vec<u8>, Error> {
    let api: Api<Secret> = Api::namespaced(kube.client.clone(), &kube.namespace);
    loop {
        match api.get_opt(SECRET).await? {
            Some(s) => match parse(&s) {
                Some(key) => return Ok(key),
                None => {
                    tracing::warn!(
                        secret = SECRET,
                        "access-token key unparsable; making a new one"
                    );
                    let key = fresh();
                    match api
                        .replace(
                            SECRET,
                            &PostParams::default(),
                            &secret(&key, s.metadata.resource_version),
                        )
                        .await
                    {
                        Ok(_) => return Ok(key),
                        // Someone else changed it first: read theirs.
                        Err(kube::Error::Api(e)) if e.code == 409 => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            },
            None => {
                let key = fresh();
                match api
                    .create(&PostParams::default(), &secret(&key, None))
                    .await
                {
                    Ok(_) => return Ok(key),
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

/// Follows the Secret: a valid new key is loaded; the leader repairs an unparsable or
/// deleted Secret (with the key in use, so that tokens stay valid).
pub async fn follow(kube: Arc<Kube>, core: Arc<Core>, leader: watch::Receiver<bool>) {
    let api: Api<Secret> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={SECRET}"));
    let stream = watcher::watcher(api.clone(), config).default_backoff();
    futures_util::pin_mut!(stream);
    let mut listed_one = false;
    while let Some(ev) = stream.next().await {
        let repair = match ev {
            Ok(watcher::Event::Init) => {
                listed_one = false;
                None
            }
            Ok(watcher::Event::Apply(s)) | Ok(watcher::Event::InitApply(s)) => {
                listed_one = true;
                match parse(&s) {
                    Some(key) => {
                        core.set_token_key(key);
                        None
                    }
                    None => Some(s.metadata.resource_version),
                }
            }
            Ok(watcher::Event::Delete(_)) => Some(None),
            Ok(watcher::Event::InitDone) if !listed_one => Some(None),
            Ok(watcher::Event::InitDone) => None,
            Err(e) => {
                tracing::warn!(watch = SECRET, error = %e, "watch failed; retrying");
                None
            }
        };
        let Some(rv) = repair else { continue };
        if !*leader.borrow() {
            continue;
        }
        let key = core.token_key();
        let result = match rv {
            Some(rv) => api
                .replace(SECRET, &PostParams::default(), &secret(&key, Some(rv)))
                .await
                .map(|_| ()),
            None => api
                .create(&PostParams::default(), &secret(&key, None))
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => tracing::warn!(
                secret = SECRET,
                "access-token Secret repaired with the key in use"
            ),
            Err(e) => {
                tracing::warn!(secret = SECRET, error = %e, "cannot repair the access-token Secret")
            }
        }
    }
}
