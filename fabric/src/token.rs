//! Access tokens: HS256 JWTs minted by the exporting peer's control plane on
//! `POST /authz` and verified here, on the exporting gateway, for every CONNECT
//! without a call to the control plane. Unlike ClusterLink's, a token names the peer
//! that issued it (`iss`, the exporting peer), the peer it was issued to (`aud`, the
//! requesting peer) and the policy epoch it was minted under, so a token is good only
//! at its issuer's gateways, cannot be replayed by another peer, and a policy change
//! invalidates older tokens.
//! Verification is constant-time in the signature and never panics on input.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ring::hmac;
use serde::{Deserialize, Serialize};

/// The only header we mint and accept: `{"alg":"HS256","typ":"JWT"}`.
const HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";
/// Longest token accepted; anything longer is refused before any work.
const MAX_TOKEN_LEN: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("no token key configured")]
    NoKey,
    #[error("malformed token")]
    Malformed,
    #[error("bad token signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token minted under policy epoch {got}, older than {min}")]
    StaleEpoch { got: u64, min: u64 },
    #[error("token issued to {aud:?}, presented by {peer:?}")]
    WrongPeer { aud: String, peer: String },
    #[error("token issued by {iss:?}, presented at {issuer:?}")]
    WrongIssuer { iss: String, issuer: String },
}

/// What a token grants: peer `aud` may connect to export `export_namespace/export_name`
/// of peer `iss` until `exp` (seconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub export_namespace: String,
    pub export_name: String,
    pub exp: u64,
    pub epoch: u64,
}

/// Signs claims into a compact JWT.
pub fn mint(key: &[u8], claims: &Claims) -> String {
    // Serializing a struct of strings and integers cannot fail.
    let body = serde_json::to_vec(claims).unwrap_or_default();
    let signing_input = format!("{HEADER}.{}", B64.encode(body));
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, key),
        signing_input.as_bytes(),
    );
    format!("{signing_input}.{}", B64.encode(tag.as_ref()))
}

/// Verifies signature, expiry, epoch, that the token was issued by `issuer` (the peer
/// verifying it) and to `peer` (the one presenting it).
pub fn verify(
    key: &[u8],
    min_epoch: u64,
    token: &str,
    issuer: &str,
    peer: &str,
    now_unix: u64,
) -> Result<Claims, Error> {
    if key.is_empty() {
        return Err(Error::NoKey);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(Error::Malformed);
    }
    let (signing_input, sig) = token.rsplit_once('.').ok_or(Error::Malformed)?;
    let (header, body) = signing_input.split_once('.').ok_or(Error::Malformed)?;
    if header != HEADER {
        return Err(Error::Malformed);
    }
    let sig = B64.decode(sig).map_err(|_| Error::Malformed)?;
    hmac::verify(
        &hmac::Key::new(hmac::HMAC_SHA256, key),
        signing_input.as_bytes(),
        &sig,
    )
    .map_err(|_| Error::Signature)?;
    let body = B64.decode(body).map_err(|_| Error::Malformed)?;
    let claims: Claims = serde_json::from_slice(&body).map_err(|_| Error::Malformed)?;
    if claims.exp <= now_unix {
        return Err(Error::Expired);
    }
    if claims.epoch < min_epoch {
        return Err(Error::StaleEpoch {
            got: claims.epoch,
            min: min_epoch,
        });
    }
    if !crate::identity::same_peer(&claims.iss, issuer) {
        return Err(Error::WrongIssuer {
            iss: claims.iss,
            issuer: issuer.to_owned(),
        });
    }
    if !crate::identity::same_peer(&claims.aud, peer) {
        return Err(Error::WrongPeer {
            aud: claims.aud,
            peer: peer.to_owned(),
        });
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn claims() -> Claims {
        Claims {
            iss: "peer-b".into(),
            aud: "peer-a".into(),
            export_namespace: "default".into(),
            export_name: "echo".into(),
            exp: 1_000,
            epoch: 3,
        }
    }

    #[test]
    fn round_trip() {
        let t = mint(KEY, &claims());
        assert_eq!(verify(KEY, 3, &t, "peer-b", "peer-a", 999), Ok(claims()));
    }

    #[test]
    fn refuses_forged_expired_stale_foreign_and_elsewhere() {
        let t = mint(KEY, &claims());
        let other = mint(b"another key, 32 bytes long......", &claims());
        let v =
            |key: &[u8], min, t: &str, issuer, peer, now| verify(key, min, t, issuer, peer, now);
        assert_eq!(
            v(KEY, 3, &other, "peer-b", "peer-a", 999),
            Err(Error::Signature)
        );
        assert_eq!(
            v(KEY, 3, &t, "peer-b", "peer-a", 1_000),
            Err(Error::Expired)
        );
        assert_eq!(
            v(KEY, 4, &t, "peer-b", "peer-a", 999),
            Err(Error::StaleEpoch { got: 3, min: 4 })
        );
        assert!(matches!(
            v(KEY, 3, &t, "peer-b", "peer-c", 999),
            Err(Error::WrongPeer { .. })
        ));
        // Another peer sharing the key (a copied jwk) still cannot take it.
        assert!(matches!(
            v(KEY, 3, &t, "peer-c", "peer-a", 999),
            Err(Error::WrongIssuer { .. })
        ));
        assert_eq!(v(&[], 0, &t, "peer-b", "peer-a", 999), Err(Error::NoKey));
    }

    #[test]
    fn tampered_claims_fail_the_signature() {
        let t = mint(KEY, &claims());
        let mut parts: Vec<&str> = t.split('.').collect();
        let mut c = claims();
        c.aud = "peer-c".into();
        let forged_body = B64.encode(serde_json::to_vec(&c).unwrap_or_default());
        parts[1] = &forged_body;
        assert_eq!(
            verify(KEY, 0, &parts.join("."), "peer-b", "peer-c", 999),
            Err(Error::Signature)
        );
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for t in ["", ".", "..", "a.b.c", "a.b", &"x".repeat(10_000), "é.é.é"] {
            assert!(verify(KEY, 0, t, "peer-b", "peer-a", 0).is_err(), "{t:?}");
        }
    }
}
