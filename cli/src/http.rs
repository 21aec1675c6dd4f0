//! A minimal HTTP/1.1 GET for the peer's loopback admin ports.

use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GET `path` from `addr` ("host:port"); returns the status and body.
pub async fn get(addr: &str, path: &str) -> Result<(u16, String)> {
    let work = async {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot reach {addr}"))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad answer from {addr}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .with_context(|| format!("{addr} did not answer"))?
}
