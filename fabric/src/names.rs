//! Name and address rules, one implementation for every crate, with Kubernetes
//! semantics: object names are DNS-1123 subdomains (lower case, at most 253
//! characters), namespaces and Import names DNS-1123 labels (at most 63), and a peer
//! name is a subdomain whose every label also fits DNS (63), because it is the DNS SAN
//! of the peer's certificate and the TLS server name its gateway is dialed by.
//! Never panics on input.

/// Why a name or address was refused; the text completes "… is not valid: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("must not be empty")]
    Empty,
    #[error("must be no more than {max} characters")]
    TooLong { max: usize },
    #[error("each dot-separated label must be no more than 63 characters")]
    LabelTooLong,
    #[error("must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character")]
    Label,
    #[error("must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character")]
    Subdomain,
    #[error("must be a DNS name that TLS accepts as a server name (not an IP address, no all-numeric last label)")]
    NotDnsName,
    #[error("must be a host name, an IPv4 address or an IPv6 address")]
    Host,
    #[error("must be host:port (with [ ] around an IPv6 address) and a port from 1 to 65535")]
    HostPort,
}

/// Longest DNS-1123 subdomain (Kubernetes object names, DNS names).
pub const MAX_SUBDOMAIN: usize = 253;
/// Longest DNS-1123 label (namespaces, Service names, one label of a DNS name).
pub const MAX_LABEL: usize = 63;

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?` without a length bound.
fn label_chars(l: &str) -> bool {
    let b = l.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            alnum(first) && alnum(last) && b.iter().all(|c| alnum(c) || *c == b'-')
        }
        _ => false,
    }
}

/// A DNS-1123 label: at most 63 characters of `[a-z0-9-]`, alphanumeric at both ends.
pub fn dns1123_label(s: &str) -> Result<(), Error> {
    if s.is_empty() {
        return Err(Error::Empty);
    }
    if s.len() > MAX_LABEL {
        return Err(Error::TooLong { max: MAX_LABEL });
    }
    if !label_chars(s) {
        return Err(Error::Label);
    }
    Ok(())
}

/// A DNS-1123 subdomain as Kubernetes checks object names: labels of `[a-z0-9-]`,
/// alphanumeric at both ends, joined by dots, at most 253 characters in all (and, as
/// in Kubernetes, no bound on one label).
pub fn dns1123_subdomain(s: &str) -> Result<(), Error> {
    if s.is_empty() {
        return Err(Error::Empty);
    }
    if s.len() > MAX_SUBDOMAIN {
        return Err(Error::TooLong { max: MAX_SUBDOMAIN });
    }
    if !s.split('.').all(label_chars) {
        return Err(Error::Subdomain);
    }
    Ok(())
}

/// A peer name: a DNS-1123 subdomain whose labels are at most 63 characters each, and
/// a name TLS takes as a server name (the SNI its gateway is dialed by).
pub fn peer_name(s: &str) -> Result<(), Error> {
    dns1123_subdomain(s)?;
    if s.split('.').any(|l| l.len() > MAX_LABEL) {
        return Err(Error::LabelTooLong);
    }
    match rustls_pki_types::ServerName::try_from(s) {
        Ok(rustls_pki_types::ServerName::DnsName(_)) => Ok(()),
        _ => Err(Error::NotDnsName),
    }
}

/// A gateway host: an IPv4 or IPv6 address (without brackets), or a host name of
/// letters, digits, '-', '_' and '.'.
pub fn host(s: &str) -> Result<(), Error> {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let name_chars = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if s.is_empty() || s.len() > MAX_SUBDOMAIN || !name_chars || s.split('.').any(str::is_empty) {
        return Err(Error::Host);
    }
    Ok(())
}

/// `host:port` for a host name or address, with an IPv6 address in brackets.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits `host:port` (`[v6]:port` for IPv6) into a host (as `host` accepts it,
/// without brackets) and a port of decimal digits from 1 to 65535.
pub fn split_host_port(s: &str) -> Result<(&str, u16), Error> {
    let (host, port) = s.rsplit_once(':').ok_or(Error::HostPort)?;
    let host = match host.strip_prefix('[') {
        Some(v6) => {
            let v6 = v6.strip_suffix(']').ok_or(Error::HostPort)?;
            v6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| Error::HostPort)?;
            v6
        }
        None if host.contains(':') => return Err(Error::HostPort),
        None => host,
    };
    self::host(host).map_err(|_| Error::HostPort)?;
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::HostPort);
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok((host, p)),
        _ => Err(Error::HostPort),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["a", "a1", "my-ns", "0", &"a".repeat(63)] {
            assert_eq!(dns1123_label(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(dns1123_label(""), Err(Error::Empty));
        assert_eq!(
            dns1123_label(&"a".repeat(64)),
            Err(Error::TooLong { max: 63 })
        );
        for bad in ["A", "-a", "a-", "a.b", "a_b", "é", " a"] {
            assert_eq!(dns1123_label(bad), Err(Error::Label), "{bad:?}");
        }
    }

    #[test]
    fn subdomains_follow_kubernetes() {
        for ok in [
            "a",
            "a.b",
            "peer-a.example.com",
            &"a".repeat(64),
            &"a".repeat(253),
        ] {
            assert_eq!(dns1123_subdomain(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(
            dns1123_subdomain(&"a".repeat(254)),
            Err(Error::TooLong { max: 253 })
        );
        for bad in [
            "Peer-A", "a..b", ".a", "a.", "-a.b", "a.b-", "a b", "a/b", "a:1",
        ] {
            assert_eq!(dns1123_subdomain(bad), Err(Error::Subdomain), "{bad:?}");
        }
    }

    #[test]
    fn peer_names_are_dns_names_too() {
        assert_eq!(peer_name("peer-a.example"), Ok(()));
        assert_eq!(peer_name(&"a".repeat(63)), Ok(()));
        assert_eq!(peer_name(&"a".repeat(64)), Err(Error::LabelTooLong));
        assert_eq!(peer_name("Peer-A"), Err(Error::Subdomain));
        assert_eq!(peer_name(""), Err(Error::Empty));
        // Valid Kubernetes names, but no TLS server name.
        for bad in ["123", "peer.1", "10.0.0.1"] {
            assert_eq!(peer_name(bad), Err(Error::NotDnsName), "{bad:?}");
        }
    }

    #[test]
    fn hosts() {
        for ok in [
            "10.0.0.1",
            "::1",
            "fe80::1",
            "gw.example",
            "gw_1.example",
            "localhost",
        ] {
            assert_eq!(host(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "",
            "gw example",
            "gw/x",
            "a@b",
            "a..b",
            ".a",
            "[::1]",
            "a:b",
        ] {
            assert_eq!(host(bad), Err(Error::Host), "{bad:?}");
        }
    }

    #[test]
    fn host_ports() {
        assert_eq!(host_port("10.0.0.1", 443), "10.0.0.1:443");
        assert_eq!(host_port("::1", 443), "[::1]:443");
        assert_eq!(host_port("[::1]", 443), "[::1]:443");
        assert_eq!(split_host_port("gw.example:4443"), Ok(("gw.example", 4443)));
        assert_eq!(split_host_port("[::1]:1"), Ok(("::1", 1)));
        for bad in [
            "",
            ":",
            "h:",
            ":1",
            "h:0",
            "h:65536",
            "h:x",
            "[::1:1",
            "::1:80",
            "[]:1",
            "h:+80",
            "[gw.example]:443",
            "g w:80",
            "h:080000",
        ] {
            assert_eq!(split_host_port(bad), Err(Error::HostPort), "{bad:?}");
        }
    }
}
