//! The access-token key in the `jwk` Secret of the ClusterLink namespace (data key
//! `key`: the base64 text of 32 random bytes), shared by every replica. Created when
//! absent, regenerated when unparsable (spec §3.4, with ClusterLink's inverted check
//! fixed), and put back with the key in use when deleted; a valid change is loaded by
//! every replica.
//!
//! The same Secret keeps the policy epoch (data key `epoch`, decimal), so that it
//! never goes backwards when control planes restart and every replica's data planes
//! ask for the same one: the leader advances it (on every change of policies or Peers
//! and when it becomes leader, since changes may have happened while no one led) and
//! records it here; the other replicas follow what is recorded.

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
const EPOCH_KEY: &str = "epoch";

/// The epoch a Secret records (0 if none, or unparsable).
fn parse_epoch(secret: &Secret) -> u64 {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(EPOCH_KEY))
        .and_then(|t| std::str::from_utf8(&t.0).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

/// The key a Secret holds, if it holds a valid one.
fn parse(secret: &Secret) -> Option<Vec<u8>> {
    let text = secret.data.as_ref()?.get(DATA_KEY)?;
    let key = B64.decode(String::from_utf8_lossy(&text.0).trim()).ok()?;
    (key.len() == 32).then_some(key)
}

fn fresh() -> Vec<u8> {
    (0..32).map(|_| rand::random::<u8>()).collect()
}

fn secret(key: &[u8], epoch: u64, resource_version: Option<String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(SECRET.into()),
            resource_version,
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            (
                DATA_KEY.to_owned(),
                ByteString(B64.encode(key).into_bytes()),
            ),
            (
                EPOCH_KEY.to_owned(),
                ByteString(epoch.to_string().into_bytes()),
            ),
        ])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// The shared key and the recorded epoch: read, created when absent (the first
/// replica wins), regenerated when unparsable.
pub async fn ensure(kube: &Kube) -> Result<(Vec<u8>, u64), Error> {
    let api: Api<Secret> = Api::namespaced(kube.client.clone(), &kube.namespace);
    loop {
        match api.get_opt(SECRET).await? {
            Some(s) => match parse(&s) {
                Some(key) => return Ok((key, parse_epoch(&s))),
                None => {
                    tracing::warn!(
                        secret = SECRET,
                        "access-token key unparsable; making a new one"
                    );
                    let key = fresh();
                    let epoch = parse_epoch(&s);
                    match api
                        .replace(
                            SECRET,
                            &PostParams::default(),
                            &secret(&key, epoch, s.metadata.resource_version),
                        )
                        .await
                    {
                        Ok(_) => return Ok((key, epoch)),
                        // Someone else changed it first: read theirs.
                        Err(kube::Error::Api(e)) if e.code == 409 => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            },
            None => {
                let key = fresh();
                match api
                    .create(&PostParams::default(), &secret(&key, 1, None))
                    .await
                {
                    Ok(_) => return Ok((key, 1)),
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
                let epoch = parse_epoch(&s);
                if epoch > 0 {
                    core.adopt_epoch(epoch);
                }
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
        let epoch = core.epoch();
        let result = match rv {
            Some(rv) => api
                .replace(
                    SECRET,
                    &PostParams::default(),
                    &secret(&key, epoch, Some(rv)),
                )
                .await
                .map(|_| ()),
            None => api
                .create(&PostParams::default(), &secret(&key, epoch, None))
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

/// The leader's part of the epoch: advances it on becoming leader, and records every
/// epoch this replica reaches while it leads (only ever upwards: a replace on the
/// version read, retried on conflict), with a backoff while the API server fails.
pub async fn keep_epoch(kube: Arc<Kube>, core: Arc<Core>, mut leader: watch::Receiver<bool>) {
    let api: Api<Secret> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let mut epochs = core.subscribe_epoch();
    let mut leading = false;
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        let now_leading = *leader.borrow_and_update();
        if now_leading != leading {
            leading = now_leading;
            core.set_advances(leading);
            if leading {
                core.advance_epoch("this replica became the leader");
            }
        }
        let wanted = *epochs.borrow_and_update();
        let mut failed = false;
        if leading {
            match record(&api, wanted).await {
                Ok(()) => backoff = std::time::Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(secret = SECRET, epoch = wanted, error = %e, "cannot record the policy epoch; retrying");
                    failed = true;
                }
            }
        }
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            continue;
        }
        tokio::select! {
            r = leader.changed() => if r.is_err() { return },
            r = epochs.changed() => if r.is_err() { return },
        }
    }
}

/// Writes `epoch` into the Secret unless it records as much already.
async fn record(api: &Api<Secret>, epoch: u64) -> Result<(), kube::Error> {
    loop {
        let Some(mut s) = api.get_opt(SECRET).await? else {
            // `follow` puts it back (with the key and the epoch in use).
            return Ok(());
        };
        if parse_epoch(&s) >= epoch {
            return Ok(());
        }
        if parse(&s).is_none() {
            // Unparsable: `follow` repairs it with the key in use and this epoch.
            return Ok(());
        }
        s.data.get_or_insert_with(BTreeMap::new).insert(
            EPOCH_KEY.to_owned(),
            ByteString(epoch.to_string().into_bytes()),
        );
        s.metadata.managed_fields = None;
        match api.replace(SECRET, &PostParams::default(), &s).await {
            Ok(_) => {
                tracing::debug!(epoch, "policy epoch recorded");
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
}
