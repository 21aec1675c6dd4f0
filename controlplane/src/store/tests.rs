//! Unit tests of `store`: the directory source against real files in a fresh temporary
//! directory per test, polled at a short interval. They never touch any path outside
//! their own temporary directory, which is removed when the test ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::UNIX_EPOCH;

use super::*;
use crate::resources::Kind;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const INTERVAL: Duration = Duration::from_millis(20);
/// How long a change may take to show; polling every 20 ms, it takes one or two.
const DEADLINE: Duration = Duration::from_secs(5);

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> std::io::Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "cl-store-{name}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    fn write(&self, file: &str, text: &str) -> std::io::Result<()> {
        std::fs::write(self.0.join(file), text)
    }

    fn remove(&self, file: &str) -> std::io::Result<()> {
        std::fs::remove_file(self.0.join(file))
    }

    fn start(&self) -> DirSource {
        DirSource::start(self.0.clone(), INTERVAL)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn export(name: &str, port: u16) -> String {
    format!(
            "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata: {{name: {name}}}\nspec: {{port: {port}}}\n"
        )
}

fn import(name: &str, lb_scheme: &str) -> String {
    format!(
            "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {{name: {name}, namespace: apps}}\nspec: {{port: 80, lbScheme: {lb_scheme}, sources: [{{peer: server}}]}}\n"
        )
}

fn peer(name: &str) -> String {
    format!(
            "apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata: {{name: {name}}}\nspec: {{gateways: [{{host: 10.0.0.1, port: 443}}]}}\n"
        )
}

fn policy(name: &str) -> String {
    format!(
            "apiVersion: clusterlink.net/v1alpha1\nkind: PrivilegedAccessPolicy\nmetadata: {{name: {name}}}\nspec: {{action: allow, from: [{{workloadSelector: {{}}}}], to: [{{workloadSelector: {{}}}}]}}\n"
        )
}

fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

fn key(kind: Kind, namespace: &str, name: &str) -> Key {
    Key {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// The Exports of a desired state, name to port.
fn exports(d: &Desired) -> BTreeMap<String, u16> {
    d.resources
        .values()
        .filter_map(|r| match r {
            Resource::Export(o) => Some((o.metadata.name.clone(), o.spec.port)),
            _ => None,
        })
        .collect()
}

fn ports(pairs: &[(&str, u16)]) -> BTreeMap<String, u16> {
    pairs.iter().map(|(n, p)| ((*n).to_owned(), *p)).collect()
}

fn lb_scheme(d: &Desired, name: &str) -> Option<String> {
    match d.resources.get(&key(Kind::Import, "apps", name)) {
        Some(Resource::Import(o)) => Some(o.spec.lb_scheme.clone()),
        _ => None,
    }
}

/// Waits, up to `DEADLINE`, for a published desired state that satisfies `ok`.
async fn wait_for(
    rx: &mut watch::Receiver<Arc<Desired>>,
    what: &str,
    ok: impl Fn(&Desired) -> bool,
) -> Result<Arc<Desired>, Box<dyn std::error::Error>> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let current = rx.borrow_and_update().clone();
        if ok(&current) {
            return Ok(current);
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(format!("{what}: the source stopped").into()),
            Err(_) => {
                return Err(format!("{what}: not within {DEADLINE:?}; last: {current:#?}").into())
            }
        }
    }
}

/// Errors of the state that concern `file`.
fn errors_of<'a>(d: &'a Desired, file: &str) -> Vec<&'a SourceError> {
    d.errors.iter().filter(|e| e.file.ends_with(file)).collect()
}

#[tokio::test]
async fn reads_every_document_of_yaml_files_only() -> TestResult {
    let dir = TempDir::new("read")?;
    dir.write(
        "a.yaml",
        &docs(&[export("e1", 1), import("i1", "random"), export("e2", 2)]),
    )?;
    dir.write(
        "b.yml",
        &format!("# peers\n---\n{}", docs(&[peer("server"), policy("p")])),
    )?;
    // Not resource files: other extensions, editor leftovers, a directory.
    dir.write("c.json", &export("json", 3))?;
    dir.write("notes.txt", &export("txt", 4))?;
    dir.write("a.yaml~", &export("backup", 5))?;
    dir.write(".a.yaml.swp", &export("swap", 6))?;
    dir.write("README", "not yaml: [")?;
    std::fs::create_dir(dir.0.join("sub.yaml"))?;
    std::fs::write(dir.0.join("sub.yaml").join("d.yaml"), export("nested", 7))?;

    let source = dir.start();
    let mut rx = source.subscribe();
    // The first scan happens in `start`: the state is complete at once.
    let d = rx.borrow_and_update().clone();
    let keys: Vec<Key> = d.resources.keys().cloned().collect();
    let mut want = vec![
        key(Kind::Peer, "", "server"),
        key(Kind::Export, "default", "e1"),
        key(Kind::Export, "default", "e2"),
        key(Kind::Import, "apps", "i1"),
        key(Kind::PrivilegedAccessPolicy, "", "p"),
    ];
    want.sort();
    assert_eq!(keys, want);
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(exports(&d), ports(&[("e1", 1), ("e2", 2)]));

    // More ignored files later cause no change to the resources.
    dir.write("later.txt", &export("later", 8))?;
    dir.write("c.yaml", &export("e3", 3))?;
    let d = wait_for(&mut rx, "new file", |d| exports(d).contains_key("e3")).await?;
    assert_eq!(exports(&d), ports(&[("e1", 1), ("e2", 2), ("e3", 3)]));
    assert_eq!(d.resources.len(), 6);
    Ok(())
}

#[tokio::test]
async fn edits_and_deletions_change_the_desired_set() -> TestResult {
    let dir = TempDir::new("edit")?;
    dir.write("a.yaml", &docs(&[export("e1", 80), export("e2", 81)]))?;
    dir.write("b.yaml", &export("e3", 82))?;
    let source = dir.start();
    let mut rx = source.subscribe();
    wait_for(&mut rx, "initial", |d| {
        exports(d) == ports(&[("e1", 80), ("e2", 81), ("e3", 82)])
    })
    .await?;

    // Change a port, drop a document, add one.
    dir.write("a.yaml", &docs(&[export("e1", 8080), export("e4", 84)]))?;
    let d = wait_for(&mut rx, "edit", |d| {
        exports(d) == ports(&[("e1", 8080), ("e3", 82), ("e4", 84)])
    })
    .await?;
    assert!(d.errors.is_empty(), "{:?}", d.errors);

    dir.remove("a.yaml")?;
    wait_for(&mut rx, "delete", |d| exports(d) == ports(&[("e3", 82)])).await?;

    // An emptied file contributes nothing.
    dir.write("b.yaml", "")?;
    let d = wait_for(&mut rx, "empty", |d| d.resources.is_empty()).await?;
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    Ok(())
}

#[tokio::test]
async fn invalid_edit_keeps_the_last_valid_version() -> TestResult {
    let dir = TempDir::new("invalid")?;
    dir.write("a.yaml", &docs(&[export("e1", 80), import("i1", "random")]))?;
    let source = dir.start();
    let mut rx = source.subscribe();
    wait_for(&mut rx, "initial", |d| {
        lb_scheme(d, "i1").as_deref() == Some("random")
    })
    .await?;

    // The Import becomes invalid while the Export changes validly: the Export's
    // change applies, the Import stays as it was, and the error names the file.
    dir.write(
        "a.yaml",
        &docs(&[export("e1", 81), import("i1", "fastest")]),
    )?;
    let d = wait_for(&mut rx, "invalid edit", |d| !d.errors.is_empty()).await?;
    assert_eq!(exports(&d), ports(&[("e1", 81)]));
    assert_eq!(lb_scheme(&d, "i1").as_deref(), Some("random"));
    assert_eq!(d.errors.len(), 1, "{:?}", d.errors);
    let e = &d.errors[0];
    assert!(e.file.ends_with("a.yaml"), "{e:?}");
    assert!(e.message.contains("spec.lbScheme"), "{e:?}");
    assert!(e.message.contains("fastest"), "{e:?}");

    // A parse failure of the same resource keeps it too.
    dir.write(
        "a.yaml",
        &docs(&[
            export("e1", 81),
            import("i1", "random").replace("port: 80", "port: 70000"),
        ]),
    )?;
    let d = wait_for(&mut rx, "unparsable edit", |d| {
        d.errors.iter().any(|e| e.message.contains("spec.port"))
    })
    .await?;
    assert_eq!(lb_scheme(&d, "i1").as_deref(), Some("random"));

    // Fixed: the new version applies and the error goes away.
    dir.write("a.yaml", &docs(&[export("e1", 81), import("i1", "static")]))?;
    let d = wait_for(&mut rx, "fix", |d| {
        lb_scheme(d, "i1").as_deref() == Some("static")
    })
    .await?;
    assert!(d.errors.is_empty(), "{:?}", d.errors);

    // An invalid resource never seen valid is simply absent, with an error.
    dir.write("b.yaml", &import("i2", "fastest"))?;
    let d = wait_for(&mut rx, "new invalid", |d| {
        !errors_of(d, "b.yaml").is_empty()
    })
    .await?;
    assert_eq!(lb_scheme(&d, "i2"), None);
    assert_eq!(d.resources.len(), 2);
    Ok(())
}

#[tokio::test]
async fn syntax_error_keeps_everything_the_file_contributed() -> TestResult {
    let dir = TempDir::new("syntax")?;
    dir.write("a.yaml", &docs(&[export("e1", 80), export("e2", 81)]))?;
    dir.write("b.yaml", &export("e3", 82))?;
    let source = dir.start();
    let mut rx = source.subscribe();
    wait_for(&mut rx, "initial", |d| d.resources.len() == 3).await?;

    // A valid first document changes, the second is not YAML: the file is
    // unreadable as a whole, so neither its edit nor its removal of e2 applies.
    dir.write(
        "a.yaml",
        &docs(&[export("e1", 9090), "metadata: {name: [broken\n".into()]),
    )?;
    let d = wait_for(&mut rx, "syntax error", |d| !d.errors.is_empty()).await?;
    assert_eq!(exports(&d), ports(&[("e1", 80), ("e2", 81), ("e3", 82)]));
    assert_eq!(d.errors.len(), 1, "{:?}", d.errors);
    assert!(d.errors[0].file.ends_with("a.yaml"), "{:?}", d.errors);

    // Other files still apply meanwhile, and the error stays reported.
    dir.write("b.yaml", &export("e3", 8282))?;
    let d = wait_for(&mut rx, "other file", |d| {
        exports(d).get("e3") == Some(&8282)
    })
    .await?;
    assert_eq!(exports(&d).get("e1"), Some(&80));
    assert_eq!(errors_of(&d, "a.yaml").len(), 1, "{:?}", d.errors);

    // Still broken differently: still everything kept.
    dir.write("a.yaml", "\t- not: [yaml\n")?;
    let d = wait_for(&mut rx, "still broken", |d| {
        d.errors.iter().any(|e| !e.message.contains("document 2"))
    })
    .await?;
    assert_eq!(exports(&d), ports(&[("e1", 80), ("e2", 81), ("e3", 8282)]));

    dir.write("a.yaml", &export("e1", 9090))?;
    let d = wait_for(&mut rx, "fixed", |d| d.errors.is_empty()).await?;
    assert_eq!(exports(&d), ports(&[("e1", 9090), ("e3", 8282)]));
    Ok(())
}

#[tokio::test]
async fn syntax_error_in_a_new_file_contributes_nothing() -> TestResult {
    let dir = TempDir::new("syntax-new")?;
    dir.write("a.yaml", &format!("{}---\n[broken\n", export("e1", 80)))?;
    let source = dir.start();
    let d = source.subscribe().borrow().clone();
    assert!(d.resources.is_empty());
    assert_eq!(errors_of(&d, "a.yaml").len(), 1, "{:?}", d.errors);
    Ok(())
}

#[tokio::test]
async fn first_file_wins_a_duplicate() -> TestResult {
    let dir = TempDir::new("dup")?;
    // Paths sort bytewise: "10-..." before "9-...".
    dir.write("9-late.yaml", &export("e1", 9))?;
    dir.write("10-early.yaml", &export("e1", 10))?;
    let source = dir.start();
    let mut rx = source.subscribe();
    let d = rx.borrow_and_update().clone();
    assert_eq!(exports(&d), ports(&[("e1", 10)]));
    assert_eq!(d.errors.len(), 1, "{:?}", d.errors);
    let e = &d.errors[0];
    assert!(e.file.ends_with("9-late.yaml"), "{e:?}");
    assert!(e.message.contains("10-early.yaml"), "{e:?}");
    assert!(e.message.contains("Export default/e1"), "{e:?}");

    // A Peer's namespace is not part of its key: still a duplicate.
    dir.write(
        "20-peer.yaml",
        &peer("server").replace("name: server", "name: server, namespace: a"),
    )?;
    dir.write(
        "30-peer.yaml",
        &peer("server")
            .replace("name: server", "name: server, namespace: b")
            .replace("10.0.0.1", "10.0.0.2"),
    )?;
    let d = wait_for(&mut rx, "peer duplicate", |d| {
        !errors_of(d, "30-peer.yaml").is_empty()
    })
    .await?;
    match d.resources.get(&key(Kind::Peer, "", "server")) {
        Some(Resource::Peer(o)) => assert_eq!(o.spec.gateways[0].host, "10.0.0.1"),
        other => return Err(format!("want the first Peer, got {other:?}").into()),
    }

    // Once the first definition goes, the other one applies without error.
    dir.remove("10-early.yaml")?;
    dir.remove("20-peer.yaml")?;
    let d = wait_for(&mut rx, "first ones removed", |d| {
        exports(d) == ports(&[("e1", 9)]) && d.errors.is_empty()
    })
    .await?;
    match d.resources.get(&key(Kind::Peer, "", "server")) {
        Some(Resource::Peer(o)) => assert_eq!(o.spec.gateways[0].host, "10.0.0.2"),
        other => return Err(format!("want the second Peer, got {other:?}").into()),
    }
    Ok(())
}

#[tokio::test]
async fn duplicate_within_one_file() -> TestResult {
    let dir = TempDir::new("dup-one")?;
    dir.write("a.yaml", &docs(&[export("e1", 1), export("e1", 2)]))?;
    let source = dir.start();
    let d = source.subscribe().borrow().clone();
    assert_eq!(exports(&d), ports(&[("e1", 1)]));
    assert_eq!(errors_of(&d, "a.yaml").len(), 1, "{:?}", d.errors);
    Ok(())
}

#[tokio::test]
async fn a_missing_directory_is_empty_until_created() -> TestResult {
    let dir = TempDir::new("missing")?;
    let sub = dir.0.join("later");
    let source = DirSource::start(sub.clone(), INTERVAL);
    let mut rx = source.subscribe();
    assert!(rx.borrow_and_update().resources.is_empty());
    std::fs::create_dir(&sub)?;
    std::fs::write(sub.join("a.yaml"), export("e1", 1))?;
    wait_for(&mut rx, "created", |d| exports(d) == ports(&[("e1", 1)])).await?;
    Ok(())
}

#[tokio::test]
async fn same_size_edit_within_one_clock_tick_is_seen() -> TestResult {
    // Both writes get the same mtime, as on a file system with 1 s timestamps, or
    // on Linux before 6.13 whose timestamps advance once a jiffy: the stamp alone
    // cannot tell the versions apart.
    let dir = TempDir::new("coarse")?;
    let path = dir.0.join("a.yaml");
    let tick =
        UNIX_EPOCH + Duration::from_secs(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs());
    let write = |port: u16| -> std::io::Result<()> {
        std::fs::write(&path, export("e1", port))?;
        std::fs::File::options()
            .write(true)
            .open(&path)?
            .set_modified(tick)
    };
    write(1000)?;
    let source = dir.start();
    let mut rx = source.subscribe();
    assert_eq!(exports(&rx.borrow_and_update()), ports(&[("e1", 1000)]));
    write(2000)?;
    wait_for(&mut rx, "same-size edit", |d| {
        exports(d) == ports(&[("e1", 2000)])
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn rereading_young_files_publishes_nothing_new() -> TestResult {
    let dir = TempDir::new("quiet")?;
    dir.write(
        "a.yaml",
        &docs(&[export("e1", 1), import("bad", "fastest")]),
    )?;
    let source = dir.start();
    let mut rx = source.subscribe();
    let first = rx.borrow_and_update().clone();
    assert_eq!(first.errors.len(), 1, "{:?}", first.errors);
    // The file is re-read every 20 ms while young, to no visible effect.
    let quiet = tokio::time::timeout(Duration::from_millis(300), rx.changed()).await;
    assert!(quiet.is_err(), "an unchanged state was published again");
    // Neither does rewriting the same content publish anything.
    dir.write(
        "a.yaml",
        &docs(&[export("e1", 1), import("bad", "fastest")]),
    )?;
    let quiet = tokio::time::timeout(Duration::from_millis(300), rx.changed()).await;
    assert!(quiet.is_err(), "an unchanged state was published again");
    // A real change is.
    dir.write("a.yaml", &export("e1", 2))?;
    let d = wait_for(&mut rx, "change", |d| exports(d) == ports(&[("e1", 2)])).await?;
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    Ok(())
}
