//! End-to-end tests of the `clusterlink` binary: certificates, refusals, apply/delete,
//! a pair of locally deployed peers and their reachability, quickstart, help texts.
//! Every test runs the real executable with a deadline and works in its own
//! temporary directory, removed at the end.

use std::ffi::OsStr;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION};
use x509_parser::pem::Pem;
use x509_parser::public_key::PublicKey;

const BIN: &str = env!("CARGO_BIN_EXE_clusterlink");

/// How long a short command (create, apply, get, ...) may take.
const SHORT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "clusterlink-cli-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        Ok(TempDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn str(&self) -> Result<&str> {
        path_str(&self.0)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}

/// What a finished command printed.
struct Out {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(self, what: &str) -> Result<Out> {
        ensure!(
            self.status.success(),
            "{what}: exited with {}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }

    fn fails(self, what: &str) -> Result<Out> {
        ensure!(
            !self.status.success(),
            "{what}: succeeded but should have failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        ensure!(
            self.status.code().is_some(),
            "{what}: killed by a signal ({})\nstderr:\n{}",
            self.status,
            self.stderr
        );
        Ok(self)
    }

    fn stderr_has(&self, what: &str, needle: &str) -> Result<()> {
        ensure!(
            self.stderr.contains(needle),
            "{what}: stderr does not mention {needle:?}:\n{}",
            self.stderr
        );
        Ok(())
    }
}

/// Runs `clusterlink args...` to completion, killing it after `within`.
fn run_for<I, S>(args: I, within: Duration) -> Result<Out>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().into()).collect();
    let mut child = Command::new(BIN)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {BIN} {args:?}"))?;
    let reader = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out_t = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    );
    let err_t = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    );
    let end = Instant::now() + within;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_t
        .join()
        .map_err(|_| anyhow!("stdout reader panicked"))?;
    let stderr = err_t
        .join()
        .map_err(|_| anyhow!("stderr reader panicked"))?;
    match status {
        Some(status) => Ok(Out {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "clusterlink {args:?} did not finish within {within:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        ),
    }
}

fn run<I, S>(args: I) -> Result<Out>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_for(args, SHORT)
}

fn create_fabric(base: &TempDir, fabric: &str) -> Result<()> {
    run(["create", "fabric", "--name", fabric, "--path", base.str()?])?.ok("create fabric")?;
    Ok(())
}

fn create_peer(base: &TempDir, fabric: &str, peer: &str) -> Result<()> {
    run([
        "create",
        "peer-cert",
        "--name",
        peer,
        "--fabric",
        fabric,
        "--path",
        base.str()?,
    ])?
    .ok("create peer-cert")?;
    Ok(())
}

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::metadata(p)
        .with_context(|| p.display().to_string())?
        .permissions()
        .mode()
        & 0o777)
}

/// All PEM blocks of a file.
fn pems(p: &Path) -> Result<Vec<Pem>> {
    let data = std::fs::read(p).with_context(|| p.display().to_string())?;
    Pem::iter_from_buffer(&data)
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("PEM in {}", p.display()))
}

fn parse(pem: &Pem) -> Result<X509Certificate<'_>> {
    ensure!(
        pem.label == "CERTIFICATE",
        "PEM label {} is not CERTIFICATE",
        pem.label
    );
    pem.parse_x509()
        .map_err(|e| anyhow!("parsing the certificate: {e}"))
}

fn common_name<'a>(c: &'a X509Certificate<'_>) -> Result<&'a str> {
    let cn = c
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| anyhow!("no CN in {}", c.subject()))?;
    cn.as_str().map_err(|e| anyhow!("CN is not a string: {e}"))
}

fn validity_days(c: &X509Certificate<'_>) -> Result<f64> {
    let v = c.validity();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let (nb, na) = (v.not_before.timestamp(), v.not_after.timestamp());
    ensure!(nb <= now, "notBefore {nb} is in the future (now {now})");
    ensure!(
        now - nb < 3600,
        "notBefore {nb} is far in the past (now {now})"
    );
    Ok((na - nb) as f64 / 86_400.0)
}

fn files_in(dir: &Path) -> Result<Vec<String>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| dir.display().to_string())?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    v.sort();
    Ok(v)
}

fn snapshot(paths: &[&Path]) -> Result<Vec<Vec<u8>>> {
    paths
        .iter()
        .map(|p| std::fs::read(p).with_context(|| p.display().to_string()))
        .collect()
}

// ---------------------------------------------------------------------------
// 1. create fabric
// ---------------------------------------------------------------------------

/// Checks the fabric CA profile; returns the SPKI algorithm OID's dotted form.
fn check_fabric(base: &Path, fabric: &str) -> Result<()> {
    let dir = base.join(fabric);
    let (cert_p, key_p) = (dir.join("cert.pem"), dir.join("key.pem"));
    for p in [&cert_p, &key_p] {
        ensure!(mode(p)? == 0o600, "{} has mode {:o}", p.display(), mode(p)?);
    }
    let certs = pems(&cert_p)?;
    ensure!(
        certs.len() == 1,
        "fabric cert.pem holds {} PEM blocks",
        certs.len()
    );
    let keys = pems(&key_p)?;
    ensure!(
        keys.len() == 1 && keys[0].label.ends_with("PRIVATE KEY"),
        "key.pem is not one private key"
    );
    let c = parse(&certs[0])?;
    ensure!(common_name(&c)? == fabric, "CN is {}", common_name(&c)?);
    let bc = c
        .basic_constraints()?
        .ok_or_else(|| anyhow!("no BasicConstraints"))?;
    ensure!(bc.value.ca, "BasicConstraints CA is false");
    ensure!(c.is_ca(), "not a CA");
    let ku = c.key_usage()?.ok_or_else(|| anyhow!("no KeyUsage"))?;
    ensure!(
        ku.value.key_cert_sign() && ku.value.crl_sign(),
        "KeyUsage {} lacks keyCertSign or cRLSign",
        ku.value
    );
    let days = validity_days(&c)?;
    ensure!(
        (3649.0..=3653.0).contains(&days),
        "validity is {days} days, not ~10 years"
    );
    ensure!(
        c.issuer().as_raw() == c.subject().as_raw(),
        "issuer {} differs from subject {}",
        c.issuer(),
        c.subject()
    );
    c.verify_signature(None)
        .map_err(|e| anyhow!("self-signature does not verify: {e}"))?;
    Ok(())
}

#[test]
fn create_fabric_ecdsa_default() -> Result<()> {
    let t = TempDir::new("fabric")?;
    let out =
        run(["create", "fabric", "--name", "myfabric", "--path", t.str()?])?.ok("create fabric")?;
    ensure!(out.stdout.contains("myfabric"), "stdout: {}", out.stdout);
    check_fabric(t.path(), "myfabric")?;
    let certs = pems(&t.path().join("myfabric/cert.pem"))?;
    let c = parse(&certs[0])?;
    let spki = c.public_key();
    ensure!(
        spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY,
        "SPKI algorithm is {}, not id-ecPublicKey",
        spki.algorithm.algorithm
    );
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .ok_or_else(|| anyhow!("no named curve in the SPKI"))?;
    ensure!(curve == OID_EC_P256, "curve is {curve}, not P-256");
    Ok(())
}

#[test]
fn create_fabric_rsa_4096() -> Result<()> {
    let t = TempDir::new("fabric-rsa")?;
    let start = Instant::now();
    run_for(
        [
            "create",
            "fabric",
            "--name",
            "rsafabric",
            "--path",
            t.str()?,
            "--key-type",
            "rsa-4096",
        ],
        Duration::from_secs(300),
    )?
    .ok("create fabric --key-type rsa-4096")?;
    eprintln!(
        "create fabric --key-type rsa-4096 took {:?}",
        start.elapsed()
    );
    check_fabric(t.path(), "rsafabric")?;
    let certs = pems(&t.path().join("rsafabric/cert.pem"))?;
    let c = parse(&certs[0])?;
    let spki = c.public_key();
    ensure!(
        spki.algorithm.algorithm == OID_PKCS1_RSAENCRYPTION,
        "SPKI algorithm is {}, not rsaEncryption",
        spki.algorithm.algorithm
    );
    match spki.parsed()? {
        PublicKey::RSA(k) => ensure!(k.key_size() == 4096, "RSA key of {} bits", k.key_size()),
        _ => bail!("not an RSA public key"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. create peer-cert
// ---------------------------------------------------------------------------

#[test]
fn create_peer_cert_profile() -> Result<()> {
    let t = TempDir::new("peer")?;
    create_fabric(&t, "F")?;
    let out = run([
        "create",
        "peer-cert",
        "--name",
        "peer-a",
        "--fabric",
        "F",
        "--path",
        t.str()?,
    ])?
    .ok("create peer-cert")?;
    ensure!(out.stdout.contains("peer-a"), "stdout: {}", out.stdout);

    let dir = t.path().join("F/peer-a");
    let (cert_p, key_p) = (dir.join("cert.pem"), dir.join("key.pem"));
    for p in [&cert_p, &key_p] {
        ensure!(mode(p)? == 0o600, "{} has mode {:o}", p.display(), mode(p)?);
    }
    let keys = pems(&key_p)?;
    ensure!(
        keys.len() == 1 && keys[0].label.ends_with("PRIVATE KEY"),
        "key.pem is not one private key"
    );

    let chain = pems(&cert_p)?;
    ensure!(
        chain.len() == 2,
        "peer cert.pem holds {} certificates, want leaf + CA",
        chain.len()
    );
    // The second block is the fabric CA, byte for byte.
    let ca_text = std::fs::read_to_string(t.path().join("F/cert.pem"))?;
    let chain_text = std::fs::read_to_string(&cert_p)?;
    ensure!(
        chain_text.ends_with(&ca_text) && chain_text.len() > ca_text.len(),
        "peer cert.pem does not end with the fabric cert.pem"
    );
    let ca_pems = pems(&t.path().join("F/cert.pem"))?;
    ensure!(
        ca_pems.len() == 1 && chain[1].contents == ca_pems[0].contents,
        "second certificate differs from the fabric CA"
    );

    let leaf = parse(&chain[0])?;
    let ca = parse(&chain[1])?;
    ensure!(
        common_name(&leaf)? == "peer-a",
        "CN {}",
        common_name(&leaf)?
    );
    let san = leaf
        .subject_alternative_name()?
        .ok_or_else(|| anyhow!("no SubjectAlternativeName"))?;
    let names = &san.value.general_names;
    ensure!(names.len() == 1, "SANs: {names:?}");
    match &names[0] {
        x509_parser::extensions::GeneralName::DNSName(n) => {
            ensure!(*n == "peer-a", "DNS SAN {n}")
        }
        other => bail!("SAN is not a DNS name: {other:?}"),
    }
    ensure!(!leaf.is_ca(), "peer certificate is a CA");
    if let Some(bc) = leaf.basic_constraints()? {
        ensure!(!bc.value.ca, "BasicConstraints CA=true on the peer");
    }
    let ku = leaf.key_usage()?.ok_or_else(|| anyhow!("no KeyUsage"))?;
    ensure!(ku.value.digital_signature(), "KeyUsage {}", ku.value);
    ensure!(
        !ku.value.key_cert_sign() && !ku.value.crl_sign(),
        "peer may sign certificates: {}",
        ku.value
    );
    let eku = leaf
        .extended_key_usage()?
        .ok_or_else(|| anyhow!("no ExtendedKeyUsage"))?;
    ensure!(
        eku.value.server_auth && eku.value.client_auth,
        "EKU lacks serverAuth or clientAuth: {:?}",
        eku.value
    );
    ensure!(
        leaf.issuer().as_raw() == ca.subject().as_raw(),
        "issuer {} is not the CA subject {}",
        leaf.issuer(),
        ca.subject()
    );
    leaf.verify_signature(Some(ca.public_key()))
        .map_err(|e| anyhow!("peer certificate does not verify against the CA: {e}"))?;
    let days = validity_days(&leaf)?;
    ensure!((3649.0..=3653.0).contains(&days), "validity is {days} days");
    ensure!(
        leaf.public_key().algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY,
        "peer key is not ECDSA"
    );
    ensure!(
        leaf.raw_serial() != ca.raw_serial(),
        "peer and CA share a serial"
    );
    Ok(())
}

#[test]
fn create_site_certs_profile() -> Result<()> {
    let t = TempDir::new("site")?;
    let at = ["--fabric", "F", "--path", t.str()?];
    let out = run(["create", "site-certs", "--name", "peer-a"]
        .into_iter()
        .chain(at))?
    .ok("create site-certs")?;
    ensure!(out.stdout.contains("peer-a"), "stdout: {}", out.stdout);
    let dir = t.path().join("F/peer-a/site");
    let files = files_in(&dir)?;
    ensure!(
        files
            == [
                "ca.pem",
                "controlplane-cert.pem",
                "controlplane-key.pem",
                "dataplane-cert.pem",
                "dataplane-key.pem"
            ],
        "files {files:?}"
    );
    for f in &files {
        let p = dir.join(f);
        ensure!(mode(&p)? == 0o600, "{f} has mode {:o}", mode(&p)?);
    }
    let ca_pems = pems(&dir.join("ca.pem"))?;
    ensure!(ca_pems.len() == 1, "ca.pem holds {} blocks", ca_pems.len());
    let ca = parse(&ca_pems[0])?;
    ensure!(ca.is_ca(), "the site CA is not a CA");
    for (plane, server) in [("controlplane", true), ("dataplane", false)] {
        let chain = pems(&dir.join(format!("{plane}-cert.pem")))?;
        ensure!(chain.len() == 2, "{plane}: leaf and site CA");
        let leaf = parse(&chain[0])?;
        let name = format!("cl-{plane}");
        ensure!(
            common_name(&leaf)? == name,
            "{plane}: CN {}",
            common_name(&leaf)?
        );
        let san = leaf
            .subject_alternative_name()?
            .ok_or_else(|| anyhow!("{plane}: no SubjectAlternativeName"))?;
        ensure!(
            matches!(san.value.general_names.as_slice(),
                [x509_parser::extensions::GeneralName::DNSName(n)] if *n == name),
            "{plane}: SANs {:?}",
            san.value.general_names
        );
        let eku = leaf
            .extended_key_usage()?
            .ok_or_else(|| anyhow!("{plane}: no ExtendedKeyUsage"))?;
        ensure!(
            eku.value.server_auth == server && eku.value.client_auth != server,
            "{plane}: EKU {:?}",
            eku.value
        );
        leaf.verify_signature(Some(ca.public_key()))
            .map_err(|e| anyhow!("{plane}: does not verify against the site CA: {e}"))?;
        let keys = pems(&dir.join(format!("{plane}-key.pem")))?;
        ensure!(
            keys.len() == 1 && keys[0].label.ends_with("PRIVATE KEY"),
            "{plane}-key.pem is not one private key"
        );
    }
    // Never overwritten: a second run fails and changes nothing.
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    let paths: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let before = snapshot(&paths)?;
    let out = run(["create", "site-certs", "--name", "peer-a"]
        .into_iter()
        .chain(at))?
    .fails("second create site-certs")?;
    ensure!(
        out.stderr.contains("already exists"),
        "stderr: {}",
        out.stderr
    );
    let after = snapshot(&paths)?;
    ensure!(before == after, "the second run changed the files");
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Nothing is overwritten
// ---------------------------------------------------------------------------

#[test]
fn refuses_to_overwrite() -> Result<()> {
    let t = TempDir::new("overwrite")?;
    create_fabric(&t, "F")?;
    let fdir = t.path().join("F");
    let fabric_files = [fdir.join("cert.pem"), fdir.join("key.pem")];
    let before = snapshot(&[&fabric_files[0], &fabric_files[1]])?;
    run(["create", "fabric", "--name", "F", "--path", t.str()?])?
        .fails("second create fabric")?
        .stderr_has("second create fabric", "already exists")?;
    ensure!(
        snapshot(&[&fabric_files[0], &fabric_files[1]])? == before,
        "fabric files changed"
    );
    ensure!(
        files_in(&fdir)? == ["cert.pem", "key.pem"],
        "{:?}",
        files_in(&fdir)?
    );

    create_peer(&t, "F", "peer-a")?;
    let pdir = fdir.join("peer-a");
    let peer_files = [pdir.join("cert.pem"), pdir.join("key.pem")];
    let before = snapshot(&[&peer_files[0], &peer_files[1]])?;
    run([
        "create",
        "peer-cert",
        "--name",
        "peer-a",
        "--fabric",
        "F",
        "--path",
        t.str()?,
    ])?
    .fails("second create peer-cert")?
    .stderr_has("second create peer-cert", "already exists")?;
    ensure!(
        snapshot(&[&peer_files[0], &peer_files[1]])? == before,
        "peer files changed"
    );
    ensure!(files_in(&pdir)? == ["cert.pem", "key.pem"]);

    // --output pointing at an existing (empty) directory.
    let existing = t.path().join("elsewhere");
    std::fs::create_dir(&existing)?;
    let o = run([
        "create",
        "peer-cert",
        "--name",
        "peer-b",
        "--fabric",
        "F",
        "--path",
        t.str()?,
        "--output",
        path_str(&existing)?,
    ])?
    .fails("create peer-cert --output <existing dir>")?;
    o.stderr_has("--output <existing dir>", "already exists")?;
    o.stderr_has("--output <existing dir>", path_str(&existing)?)?;
    ensure!(
        files_in(&existing)?.is_empty(),
        "files written into --output"
    );
    ensure!(
        !fdir.join("peer-b").exists(),
        "peer-b written to the default place"
    );

    // --output to a new directory works, and writes only there.
    let fresh = t.path().join("fresh/peer-b");
    run([
        "create",
        "peer-cert",
        "--name",
        "peer-b",
        "--fabric",
        "F",
        "--path",
        t.str()?,
        "--output",
        path_str(&fresh)?,
    ])?
    .ok("create peer-cert --output <new dir>")?;
    ensure!(files_in(&fresh)? == ["cert.pem", "key.pem"]);
    ensure!(!fdir.join("peer-b").exists());
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. Bad peer names
// ---------------------------------------------------------------------------

#[test]
fn rejects_bad_peer_names() -> Result<()> {
    let t = TempDir::new("badname")?;
    create_fabric(&t, "F")?;
    let long = "a".repeat(64);
    let dotted_long = format!("ok.{long}.example");
    for bad in [
        "bad_name!",
        "-x",
        "",
        long.as_str(),
        dotted_long.as_str(),
        "x-",
        "a..b",
    ] {
        // `--name=<v>` so that "-x" and "" reach the command as values.
        let o = run([
            "create".to_owned(),
            "peer-cert".to_owned(),
            format!("--name={bad}"),
            "--fabric".to_owned(),
            "F".to_owned(),
            "--path".to_owned(),
            t.str()?.to_owned(),
        ])?
        .fails(&format!("peer name {bad:?}"))?;
        o.stderr_has(&format!("peer name {bad:?}"), "not a valid DNS name")?;
        ensure!(
            files_in(&t.path().join("F"))? == ["cert.pem", "key.pem"],
            "peer name {bad:?}: something was written: {:?}",
            files_in(&t.path().join("F"))?
        );
        ensure!(
            files_in(t.path())? == ["F"],
            "peer name {bad:?}: something was written: {:?}",
            files_in(t.path())?
        );
    }
    // The limits themselves are fine: a 63-character label, dots, digits, hyphens.
    create_peer(&t, "F", &"a".repeat(63))?;
    create_peer(&t, "F", "peer-1.example")?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. Missing CA
// ---------------------------------------------------------------------------

#[test]
fn missing_ca_names_the_files() -> Result<()> {
    let t = TempDir::new("noca")?;
    let o = run([
        "create",
        "peer-cert",
        "--name",
        "peer-a",
        "--fabric",
        "nosuch",
        "--path",
        t.str()?,
    ])?
    .fails("peer-cert without a fabric")?;
    let cert = t.path().join("nosuch").join("cert.pem");
    o.stderr_has("peer-cert without a fabric", path_str(&cert)?)?;
    o.stderr_has("peer-cert without a fabric", "key.pem")?;
    ensure!(
        files_in(t.path())?.is_empty(),
        "something was written: {:?}",
        files_in(t.path())?
    );

    // The certificate is there but the key is not: the key file is named.
    create_fabric(&t, "half")?;
    let key = t.path().join("half").join("key.pem");
    std::fs::remove_file(&key)?;
    let o = run([
        "create",
        "peer-cert",
        "--name",
        "peer-a",
        "--fabric",
        "half",
        "--path",
        t.str()?,
    ])?
    .fails("peer-cert without the CA key")?;
    o.stderr_has("peer-cert without the CA key", path_str(&key)?)?;
    ensure!(files_in(&t.path().join("half"))? == ["cert.pem"]);
    Ok(())
}

// ---------------------------------------------------------------------------
// 6. apply / delete
// ---------------------------------------------------------------------------

fn peer_yaml(name: &str, port: u16) -> String {
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata:\n  name: {name}\nspec:\n  gateways:\n  - host: 127.0.0.1\n    port: {port}\n"
    )
}

fn import_yaml(name: &str, lb: &str) -> String {
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  port: 9090\n  lbScheme: {lb}\n  sources:\n  - peer: peer-b\n    exportName: echo\n    exportNamespace: default\n"
    )
}

const EXPORT_YAML: &str = "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata:\n  name: echo\n  namespace: default\nspec:\n  host: 127.0.0.1\n  port: 7000\n";

#[test]
fn apply_validates_everything_then_writes() -> Result<()> {
    let t = TempDir::new("apply")?;
    create_fabric(&t, "F")?;
    create_peer(&t, "F", "peer-a")?;
    let resources = t.path().join("F/peer-a/resources");
    let at = ["--name", "peer-a", "--fabric", "F", "--path", t.str()?];

    // One valid Peer and one invalid Import in the same file: nothing is written.
    let bad = t.path().join("bad.yaml");
    std::fs::write(
        &bad,
        format!(
            "{}---\n{}",
            peer_yaml("peer-b", 4443),
            import_yaml("fast", "fastest")
        ),
    )?;
    let o = run(["apply"]
        .into_iter()
        .chain(at)
        .chain(["-f", path_str(&bad)?]))?
    .fails("apply of an invalid file")?;
    o.stderr_has("apply of an invalid file", path_str(&bad)?)?;
    o.stderr_has("apply of an invalid file", "spec.lbScheme")?;
    o.stderr_has("apply of an invalid file", "fast")?;
    o.stderr_has("apply of an invalid file", "Import")?;
    ensure!(
        files_in(&resources)?.is_empty(),
        "resources written despite the error: {:?}",
        files_in(&resources)?
    );

    // A valid file plus an invalid one: still nothing.
    let good = t.path().join("good.yaml");
    std::fs::write(
        &good,
        format!(
            "{}---\n{}---\n{}",
            peer_yaml("peer-b", 4443),
            import_yaml("echo", "round-robin"),
            EXPORT_YAML
        ),
    )?;
    run(["apply"]
        .into_iter()
        .chain(at)
        .chain(["-f", path_str(&good)?, "-f", path_str(&bad)?]))?
    .fails("apply of a good and a bad file")?
    .stderr_has("apply of a good and a bad file", path_str(&bad)?)?;
    ensure!(
        files_in(&resources)?.is_empty(),
        "{:?}",
        files_in(&resources)?
    );

    // The valid file alone: one file per resource.
    let o = run(["apply"]
        .into_iter()
        .chain(at)
        .chain(["-f", path_str(&good)?]))?
    .ok("apply of a valid file")?;
    ensure!(
        o.stdout
            .lines()
            .filter(|l| l.contains("configured"))
            .count()
            == 3,
        "stdout: {}",
        o.stdout
    );
    let written = files_in(&resources)?;
    ensure!(written.len() == 3, "resources: {written:?}");
    ensure!(
        written
            .iter()
            .all(|f| f.ends_with(".yaml") && !f.starts_with('.')),
        "resources: {written:?}"
    );
    let all = written
        .iter()
        .map(|f| std::fs::read_to_string(resources.join(f)))
        .collect::<std::io::Result<Vec<_>>>()?
        .join("\n");
    for needle in [
        "kind: Peer",
        "kind: Import",
        "kind: Export",
        "peer-b",
        "echo",
    ] {
        ensure!(
            all.contains(needle),
            "written resources lack {needle:?}:\n{all}"
        );
    }
    // Applying again is an update, not an error.
    run(["apply"]
        .into_iter()
        .chain(at)
        .chain(["-f", path_str(&good)?]))?
    .ok("second apply")?;
    ensure!(files_in(&resources)?.len() == 3);

    // delete -f removes them all; a second delete says they are gone.
    run(["delete"]
        .into_iter()
        .chain(at)
        .chain(["-f", path_str(&good)?]))?
    .ok("delete")?;
    ensure!(
        files_in(&resources)?.is_empty(),
        "after delete: {:?}",
        files_in(&resources)?
    );
    run(["delete"]
        .into_iter()
        .chain(at)
        .chain(["-f", path_str(&good)?]))?
    .fails("second delete")?
    .stderr_has("second delete", "not found")?;

    // apply to a peer that has no directory is refused.
    run([
        "apply",
        "--name",
        "nosuch",
        "--fabric",
        "F",
        "--path",
        t.str()?,
        "-f",
        path_str(&good)?,
    ])?
    .fails("apply to a missing peer")?;
    ensure!(!t.path().join("F/nosuch").exists());
    Ok(())
}

// ---------------------------------------------------------------------------
// 7. deploy peer + get: PeerReachable True, then False
// ---------------------------------------------------------------------------

/// A `clusterlink deploy peer` child, stopped (SIGTERM, then SIGKILL) on drop.
struct Deployed {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Deployed {
    fn start(base: &TempDir, fabric: &str, name: &str) -> Result<Deployed> {
        let log = base.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(BIN)
            .args(["deploy", "peer", "--platform", "local", "--name", name])
            .args(["--fabric", fabric, "--path", base.str()?])
            .args(["--gateway-port", "0", "--admin-port", "0"])
            .args(["--drain-timeout", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .context("starting clusterlink deploy peer")?;
        Ok(Deployed {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the peer already exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(s) = c.try_wait()? {
                bail!(
                    "deploy peer {} exited early ({s}):\n{}",
                    self.name,
                    self.log()
                );
            }
        }
        Ok(())
    }

    /// SIGTERM, then wait up to `within` (SIGKILL after that).
    fn stop(&mut self, within: Duration) -> Result<Option<ExitStatus>> {
        let Some(mut c) = self.child.take() else {
            return Ok(None);
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id())?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + within;
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= end {
                let _ = c.kill();
                let _ = c.wait();
                bail!(
                    "deploy peer {} did not stop within {within:?} of SIGTERM:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Deployed {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop(Duration::from_secs(20));
        }
    }
}

/// Waits for `<peer dir>/run.json` and returns its gateway port.
fn wait_run_json(d: &mut Deployed, peer_dir: &Path, within: Duration) -> Result<u16> {
    let file = peer_dir.join("run.json");
    let end = Instant::now() + within;
    loop {
        d.check_running()?;
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                let port = v["gateway_port"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("run.json without gateway_port: {text}"))?;
                ensure!(port != 0, "run.json records gateway port 0");
                return Ok(u16::try_from(port)?);
            }
        }
        ensure!(
            Instant::now() < end,
            "{} did not appear within {within:?}:\n{}",
            file.display(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The PeerReachable status ("True"/"False") of `peer` in `get peers -o json`, if any.
fn reachable_json(at: &[&str], peer: &str) -> Result<Option<String>> {
    let o = run(["get", "peers"]
        .into_iter()
        .chain(at.iter().copied())
        .chain(["-o", "json"]))?;
    if !o.status.success() {
        // The control plane may not answer yet.
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_str(&o.stdout)
        .with_context(|| format!("get peers -o json printed: {}", o.stdout))?;
    let items = v["items"]
        .as_array()
        .ok_or_else(|| anyhow!("no items: {}", o.stdout))?;
    let Some(item) = items.iter().find(|i| i["metadata"]["name"] == peer) else {
        return Ok(None);
    };
    Ok(item["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "PeerReachable"))
        .and_then(|c| c["status"].as_str())
        .map(str::to_owned))
}

/// The row of `peer` in the `get peers` table: [name, gateways, reachable, since].
fn table_row(at: &[&str], peer: &str) -> Result<Option<Vec<String>>> {
    let o = run(["get", "peers"].into_iter().chain(at.iter().copied()))?;
    if !o.status.success() {
        return Ok(None);
    }
    let mut lines = o.stdout.lines();
    let head = lines.next().unwrap_or_default();
    ensure!(
        head.split_whitespace().collect::<Vec<_>>() == ["NAME", "GATEWAYS", "REACHABLE", "SINCE"],
        "table header: {head:?}"
    );
    Ok(lines
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cols| cols.first().map(String::as_str) == Some(peer)))
}

fn looks_like_time(s: &str) -> bool {
    // RFC 3339 UTC, e.g. 2024-05-01T10:00:01Z.
    s.len() >= 20
        && s.ends_with('Z')
        && s.as_bytes().get(10) == Some(&b'T')
        && s.bytes().take(4).all(|b| b.is_ascii_digit())
}

/// Polls until `peer`'s PeerReachable is `want` in the JSON and the table.
fn wait_reachable(
    at: &[&str],
    peer: &str,
    want: &str,
    within: Duration,
    watch: &mut [&mut Deployed],
) -> Result<Vec<String>> {
    let end = Instant::now() + within;
    let mut last = (None, None);
    loop {
        for d in watch.iter_mut() {
            d.check_running()?;
        }
        let json = reachable_json(at, peer)?;
        if json.as_deref() == Some(want) {
            let row = table_row(at, peer)?;
            if let Some(row) = &row {
                if row.get(2).map(String::as_str) == Some(want) {
                    ensure!(
                        row.len() == 4 && looks_like_time(&row[3]),
                        "table row without a time: {row:?}"
                    );
                    return Ok(row.clone());
                }
            }
            last = (json, row);
        } else {
            last.0 = json;
        }
        ensure!(
            Instant::now() < end,
            "PeerReachable of {peer} did not become {want} within {within:?} (last: json {:?}, table {:?})",
            last.0,
            last.1
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn deploy_get_reachability() -> Result<()> {
    let t = TempDir::new("deploy")?;
    create_fabric(&t, "F")?;
    create_peer(&t, "F", "a")?;
    create_peer(&t, "F", "b")?;
    let (adir, bdir) = (t.path().join("F/a"), t.path().join("F/b"));

    let mut a = Deployed::start(&t, "F", "a")?;
    let mut b = Deployed::start(&t, "F", "b")?;
    let started = Instant::now();
    wait_run_json(&mut a, &adir, Duration::from_secs(60))?;
    let b_port = wait_run_json(&mut b, &bdir, Duration::from_secs(60))?;

    let at = ["--name", "a", "--fabric", "F", "--path", t.str()?];
    let file = t.path().join("peer-b.yaml");
    std::fs::write(&file, peer_yaml("b", b_port))?;
    run(["apply"]
        .into_iter()
        .chain(at)
        .chain(["-f", path_str(&file)?]))?
    .ok("apply Peer b on a")?;

    let row = wait_reachable(
        &at,
        "b",
        "True",
        Duration::from_secs(60),
        &mut [&mut a, &mut b],
    )?;
    ensure!(
        row[1] == format!("127.0.0.1:{b_port}"),
        "gateways column: {row:?}"
    );
    eprintln!("b reachable after {:?}", started.elapsed());

    // A single peer by name, as JSON.
    let o = run(["get", "peers", "b"]
        .into_iter()
        .chain(at)
        .chain(["-o", "json"]))?
    .ok("get peers b -o json")?;
    let v: serde_json::Value = serde_json::from_str(&o.stdout)?;
    ensure!(v["metadata"]["name"] == "b", "get peers b: {}", o.stdout);

    // Stop b: it exits 0 and removes its run.json; a then sees it unreachable.
    let stopping = Instant::now();
    let status = b
        .stop(Duration::from_secs(30))?
        .ok_or_else(|| anyhow!("b was not running"))?;
    ensure!(status.success(), "b exited with {status}:\n{}", b.log());
    ensure!(
        !bdir.join("run.json").exists(),
        "b left its run.json behind"
    );
    eprintln!("b stopped in {:?}", stopping.elapsed());
    let row = wait_reachable(&at, "b", "False", Duration::from_secs(45), &mut [&mut a])?;
    eprintln!(
        "b unreachable {:?} after it stopped: {row:?}",
        stopping.elapsed()
    );

    // get against a stopped peer explains itself.
    let o = run([
        "get",
        "peers",
        "--name",
        "b",
        "--fabric",
        "F",
        "--path",
        t.str()?,
    ])?
    .fails("get on a stopped peer")?;
    o.stderr_has("get on a stopped peer", "not running")?;

    let status = a
        .stop(Duration::from_secs(30))?
        .ok_or_else(|| anyhow!("a was not running"))?;
    ensure!(status.success(), "a exited with {status}:\n{}", a.log());
    Ok(())
}

/// A TCP echo service on 127.0.0.1 (a thread per connection), for the lifetime of the
/// test process.
fn echo_service() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s;
                let Ok(mut w) = r.try_clone() else { return };
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    Ok(port)
}

/// One line through the import on 127.0.0.1:`port`, echoed back.
fn echoes(port: u16, within: Duration) -> bool {
    use std::io::Write as _;
    let end = Instant::now() + within;
    while Instant::now() < end {
        let ok = (|| -> Result<bool> {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"ping\n")?;
            let mut b = [0u8; 5];
            c.read_exact(&mut b)?;
            Ok(&b == b"ping\n")
        })();
        if matches!(ok, Ok(true)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// The PID of the child of `parent` whose command name is `comm`.
fn child_named(parent: u32, comm: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let ppid = stat[close + 1..].split_whitespace().nth(1);
        if name == comm && ppid == Some(&parent.to_string()) {
            return Some(pid);
        }
    }
    None
}

fn kill9(pid: u32) -> Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    Ok(())
}

/// `deploy peer` supervises its two components: the exporting peer's control plane
/// killed (-9) is restarted while its data plane keeps serving, so an established
/// connection through the import carries on and new ones work once it is back; its
/// data plane killed is restarted too; a control plane that dies at every start ends
/// the peer with the reason. Before, the death of either component stopped both.
#[test]
fn deploy_restarts_a_dead_component_and_keeps_the_other_serving() -> Result<()> {
    let t = TempDir::new("supervise")?;
    create_fabric(&t, "F")?;
    create_peer(&t, "F", "peer-a")?;
    create_peer(&t, "F", "peer-b")?;
    let (adir, bdir) = (t.path().join("F/peer-a"), t.path().join("F/peer-b"));
    let mut a = Deployed::start(&t, "F", "peer-a")?;
    let mut b = Deployed::start(&t, "F", "peer-b")?;
    let a_port = wait_run_json(&mut a, &adir, Duration::from_secs(60))?;
    let b_port = wait_run_json(&mut b, &bdir, Duration::from_secs(60))?;
    let target = echo_service()?;
    let import = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let allow = "apiVersion: clusterlink.net/v1alpha1\nkind: AccessPolicy\nmetadata:\n  name: allow-all\n  namespace: default\nspec:\n  action: allow\n  from:\n  - workloadSelector: {}\n  to:\n  - workloadSelector: {}\n";
    let apply = |peer: &str, file: &str, yaml: String| -> Result<()> {
        let path = t.path().join(file);
        std::fs::write(&path, yaml)?;
        run([
            "apply",
            "--name",
            peer,
            "--fabric",
            "F",
            "--path",
            t.str()?,
            "-f",
            path_str(&path)?,
        ])?
        .ok(&format!("apply {file}"))?;
        Ok(())
    };
    apply("peer-a", "a-peer.yaml", peer_yaml("peer-b", b_port))?;
    apply("peer-b", "b-peer.yaml", peer_yaml("peer-a", a_port))?;
    apply("peer-a", "a-allow.yaml", allow.to_owned())?;
    apply("peer-b", "b-allow.yaml", allow.to_owned())?;
    apply(
        "peer-b",
        "export.yaml",
        format!("apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata:\n  name: echo\n  namespace: default\nspec:\n  host: 127.0.0.1\n  port: {target}\n"),
    )?;
    apply(
        "peer-a",
        "import.yaml",
        format!("apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata:\n  name: echo\n  namespace: default\nspec:\n  port: {import}\n  sources:\n  - peer: peer-b\n    exportName: echo\n    exportNamespace: default\n"),
    )?;
    ensure!(
        echoes(import, Duration::from_secs(60)),
        "no traffic through the import:\n{}",
        b.log()
    );

    // An established connection, then b's control plane dies.
    let mut held = std::net::TcpStream::connect(("127.0.0.1", import))?;
    held.set_read_timeout(Some(Duration::from_secs(5)))?;
    let round = |c: &mut std::net::TcpStream, msg: &[u8]| -> Result<()> {
        use std::io::Write as _;
        c.write_all(msg)?;
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got)?;
        ensure!(got == msg, "echo differs");
        Ok(())
    };
    round(&mut held, b"before")?;
    let b_pid = b.child.as_ref().map(Child::id).context("b runs")?;
    let cp = child_named(b_pid, "cl-controlplane").context("b's control plane")?;
    kill9(cp)?;
    round(&mut held, b"while the control plane is dead")?;
    let end = Instant::now() + Duration::from_secs(30);
    let restarted = loop {
        b.check_running()?;
        if let Some(p) = child_named(b_pid, "cl-controlplane").filter(|p| *p != cp) {
            break p;
        }
        ensure!(
            Instant::now() < end,
            "b's control plane was not restarted:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        b.log().contains("cl-controlplane: died"),
        "no reason logged:\n{}",
        b.log()
    );
    round(&mut held, b"after the restart")?;
    ensure!(
        echoes(import, Duration::from_secs(60)),
        "no new connection after the control plane restart:\n{}",
        b.log()
    );

    // b's data plane dies: restarted, and the import carries again.
    let dp = child_named(b_pid, "cl-dataplane").context("b's data plane")?;
    kill9(dp)?;
    let end = Instant::now() + Duration::from_secs(30);
    while child_named(b_pid, "cl-dataplane")
        .filter(|p| *p != dp)
        .is_none()
    {
        b.check_running()?;
        ensure!(
            Instant::now() < end,
            "b's data plane was not restarted:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        echoes(import, Duration::from_secs(60)),
        "no traffic after the data plane restart:\n{}",
        b.log()
    );

    // A control plane that cannot start (its certificate now unreadable garbage) dies
    // at every restart: the peer gives up, naming it.
    std::fs::write(bdir.join("cert.pem"), "garbage")?;
    kill9(restarted)?;
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(c) = b.child.as_mut() {
            if let Some(s) = c.try_wait()? {
                break s;
            }
        }
        ensure!(Instant::now() < end, "deploy did not give up:\n{}", b.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    b.child = None;
    ensure!(!status.success(), "deploy exited 0 after giving up");
    ensure!(
        b.log().contains("cl-controlplane keeps dying"),
        "{}",
        b.log()
    );
    drop(held);
    a.stop(Duration::from_secs(30))?;
    Ok(())
}

#[test]
fn deploy_k8s_without_certificates_names_the_folder() -> Result<()> {
    let t = TempDir::new("k8s")?;
    run([
        "deploy",
        "peer",
        "--platform",
        "k8s",
        "--start",
        "none",
        "--name",
        "a",
        "--path",
        t.str()?,
    ])?
    .fails("deploy --platform k8s")?
    .stderr_has("deploy --platform k8s", "default_fabric/a not found")?;
    ensure!(files_in(t.path())?.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------
// 8. quickstart
// ---------------------------------------------------------------------------

/// The number just before `unit` on the first line containing `unit`.
fn number_before(text: &str, unit: &str) -> Result<f64> {
    let line = text
        .lines()
        .find(|l| l.contains(unit))
        .ok_or_else(|| anyhow!("no {unit:?} line in:\n{text}"))?;
    let before = line
        .split(unit)
        .next()
        .and_then(|s| s.split_whitespace().last())
        .ok_or_else(|| anyhow!("no number before {unit:?} in {line:?}"))?;
    before
        .parse()
        .with_context(|| format!("{before:?} before {unit:?} in {line:?}"))
}

/// The number just after `label` on the first line containing `label`.
fn number_after(text: &str, label: &str) -> Result<f64> {
    let line = text
        .lines()
        .find(|l| l.contains(label))
        .ok_or_else(|| anyhow!("no {label:?} line in:\n{text}"))?;
    let after = line
        .split_once(label)
        .and_then(|(_, s)| s.split_whitespace().next())
        .ok_or_else(|| anyhow!("no number after {label:?} in {line:?}"))?;
    after
        .trim_end_matches(',')
        .parse()
        .with_context(|| format!("{after:?} after {label:?} in {line:?}"))
}

#[test]
fn quickstart_reports_traffic() -> Result<()> {
    let start = Instant::now();
    let o = run_for(["quickstart"], Duration::from_secs(240))?.ok("quickstart")?;
    eprintln!("quickstart took {:?}", start.elapsed());
    let conns = number_before(&o.stdout, "connections/s")?;
    let gbit = number_before(&o.stdout, "Gbit/s")?;
    let p50 = number_after(&o.stdout, "p50")?;
    let p99 = number_after(&o.stdout, "p99")?;
    eprintln!("quickstart: {conns} connections/s, {gbit} Gbit/s, p50 {p50} µs, p99 {p99} µs");
    ensure!(conns > 0.0, "connections/s is {conns}:\n{}", o.stdout);
    ensure!(gbit > 0.0, "Gbit/s is {gbit}:\n{}", o.stdout);
    ensure!(p50 > 0.0, "p50 is {p50}:\n{}", o.stdout);
    ensure!(p99 >= p50, "p99 {p99} < p50 {p50}");
    ensure!(
        o.stdout.contains("quickstart finished"),
        "stdout:\n{}",
        o.stdout
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 9. --version and --help
// ---------------------------------------------------------------------------

#[test]
fn version_and_help() -> Result<()> {
    let o = run(["--version"])?.ok("--version")?;
    ensure!(
        o.stdout.trim() == format!("clusterlink {}", env!("CARGO_PKG_VERSION")),
        "--version printed {:?}",
        o.stdout
    );
    for cmd in [
        &["create", "fabric"][..],
        &["create", "peer-cert"],
        &["deploy", "peer"],
        &["apply"],
        &["delete"],
        &["get"],
        &["quickstart"],
    ] {
        let o = run(cmd.iter().copied().chain(["--help"]))?.ok(&format!("{cmd:?} --help"))?;
        ensure!(
            o.stdout.contains("Example"),
            "{cmd:?} --help has no example:\n{}",
            o.stdout
        );
    }
    // An unknown subcommand fails with a usage error.
    run(["frobnicate"])?.fails("unknown subcommand")?;
    Ok(())
}
