//! Unit tests of `lb`: ClusterLink's selection order for each scheme, failover, the
//! delayed phase and the shared round-robin counters. They never look at peers,
//! policies or the network: which source fails is scripted by each test.

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const IMPORT: &str = "default/my-import";

/// One connection as egress authorization (3.7 step 4) runs it: sources in
/// `broken` fail (export deleted ⇒ the remote peer refuses), the first other wins.
fn connect(cursor: &mut Cursor, broken: &[usize]) -> Result<usize, Error> {
    loop {
        let index = cursor.select()?;
        if !broken.contains(&index) {
            return Ok(index);
        }
    }
}

/// `count` connections to a 3-source import, each with a fresh cursor.
fn connections(
    counters: &Counters,
    scheme: LbScheme,
    broken: &[usize],
    count: usize,
) -> Result<Vec<usize>, Error> {
    (0..count)
        .map(|_| connect(&mut counters.cursor(IMPORT, scheme, 3), broken))
        .collect()
}

/// Every index a request visits, in order, until it is exhausted.
fn all_picks(cursor: &mut Cursor) -> (Vec<usize>, Error) {
    let mut picks = Vec::new();
    loop {
        match cursor.select() {
            Ok(index) => picks.push(index),
            Err(err) => return (picks, err),
        }
    }
}

#[test]
fn round_robin_reproduces_test_load_balancing_round_robin() -> TestResult {
    // 7.2 TestLoadBalancingRoundRobin, sources [cl0, cl1, cl2], one shared counter
    // across the three phases.
    let counters = Counters::new();

    // "30 accesses: the i-th (0-based) returns cl[(i+1)%3] (counter starts at 1)".
    let got = connections(&counters, LbScheme::RoundRobin, &[], 30)?;
    let want: Vec<usize> = (0..30).map(|i| (i + 1) % 3).collect();
    assert_eq!(got, want);
    assert_eq!(got[..4], [1, 2, 0, 1]);

    // "Delete cl0's Export ⇒ 30 accesses return cl[1+(i%2)] (alternating cl1, cl2,
    // failover consumes a counter step)".
    let got = connections(&counters, LbScheme::RoundRobin, &[0], 30)?;
    let want: Vec<usize> = (0..30).map(|i| 1 + i % 2).collect();
    assert_eq!(got, want);

    // "Delete cl1's Export ⇒ 30 accesses all return cl2".
    let got = connections(&counters, LbScheme::RoundRobin, &[0, 1], 30)?;
    assert_eq!(got, vec![2; 30]);
    Ok(())
}

#[test]
fn round_robin_with_source_0_broken_alternates_from_a_fresh_import() -> TestResult {
    // 3.8: "with sources 0,1,2 and source 0 broken, successive connections
    // alternate 1,2,1,2…" — counter 1→1, 2→2, 3→0 fails, 4→1, 5→2, 6→0 fails, 7→1.
    let counters = Counters::new();
    let got = connections(&counters, LbScheme::RoundRobin, &[0], 8)?;
    assert_eq!(got, [1, 2, 1, 2, 1, 2, 1, 2]);
    Ok(())
}

#[test]
fn round_robin_counter_advances_on_failover() -> TestResult {
    // 3.8 / 9.4: the counter is pre-incremented on every select, failovers included.
    let counters = Counters::new();
    let mut first = counters.cursor(IMPORT, LbScheme::RoundRobin, 3);
    assert_eq!(first.select()?, 1); // counter 1
    assert_eq!(first.select()?, 2); // failover: counter 2, current + 1
    assert_eq!(first.select()?, 0); // failover: counter 3, wraps to 0
    assert_eq!(first.select(), Err(Error::Exhausted(3)));
    assert_eq!(counters.counter(IMPORT).load(Ordering::Relaxed), 3);

    let mut second = counters.cursor(IMPORT, LbScheme::RoundRobin, 3);
    assert_eq!(second.select()?, 1); // counter 4: 4 mod 3
    Ok(())
}

#[test]
fn round_robin_counter_wraps_like_go_uint32() -> TestResult {
    // Go's counter is an atomic.Uint32: after u32::MAX the next value is 0.
    let counter = Arc::new(Counter::new(u32::MAX - 1));
    let picks: Vec<usize> = (0..3)
        .map(|_| Cursor::new(LbScheme::RoundRobin, 3, Arc::clone(&counter)).select())
        .collect::<Result<_, _>>()?;
    // u32::MAX mod 3 == 0, then 0 mod 3 == 0, then 1 mod 3 == 1.
    assert_eq!(picks, [0, 0, 1]);
    Ok(())
}

#[test]
fn counters_are_per_import_and_forgotten_on_delete() -> TestResult {
    let counters = Counters::new();
    let picks = |import: &str| {
        (0..2)
            .map(|_| counters.cursor(import, LbScheme::RoundRobin, 3).select())
            .collect::<Result<Vec<_>, _>>()
    };
    assert_eq!(picks("ns/a")?, [1, 2]);
    assert_eq!(picks("ns/b")?, [1, 2]);
    assert_eq!(picks("ns/a")?, [0, 1]);

    counters.forget("ns/a");
    assert_eq!(picks("ns/a")?, [1, 2]);
    assert_eq!(picks("ns/b")?, [0, 1]);
    Ok(())
}

#[test]
fn other_schemes_do_not_touch_the_round_robin_counter() -> TestResult {
    let counters = Counters::new();
    connections(&counters, LbScheme::Static, &[0], 5)?;
    connections(&counters, LbScheme::Random, &[0], 5)?;
    // Switching the import to round-robin still starts at index 1.
    assert_eq!(
        connections(&counters, LbScheme::RoundRobin, &[], 2)?,
        [1, 2]
    );
    Ok(())
}

#[test]
fn round_robin_counter_is_shared_across_threads() -> TestResult {
    let counters = Counters::new();
    let histograms = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| connections(&counters, LbScheme::RoundRobin, &[], 300)))
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().map_err(|_| "worker panicked"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let mut hits = [0usize; 3];
    for picks in histograms {
        for index in picks? {
            hits[index] += 1;
        }
    }
    // 1200 pre-increments, no lost updates: each index exactly a third.
    assert_eq!(hits, [400, 400, 400]);
    assert_eq!(counters.counter(IMPORT).load(Ordering::Relaxed), 1200);
    Ok(())
}

#[test]
fn static_reproduces_test_load_balancing_static() -> TestResult {
    // 7.2 TestLoadBalancingStatic: "30 accesses ⇒ all cl0; delete cl0 export ⇒
    // all cl1; delete cl1 export ⇒ all cl2."
    let counters = Counters::new();
    assert_eq!(
        connections(&counters, LbScheme::Static, &[], 30)?,
        vec![0; 30]
    );
    assert_eq!(
        connections(&counters, LbScheme::Static, &[0], 30)?,
        vec![1; 30]
    );
    assert_eq!(
        connections(&counters, LbScheme::Static, &[0, 1], 30)?,
        vec![2; 30]
    );
    Ok(())
}

#[test]
fn static_fails_over_in_list_order_then_is_exhausted() {
    // 3.8 static: "currentIndex++ (0, 1, 2 … in list order)".
    let mut cursor = Cursor::new(LbScheme::Static, 3, Arc::default());
    assert_eq!(all_picks(&mut cursor), (vec![0, 1, 2], Error::Exhausted(3)));
}

#[test]
fn random_reproduces_test_load_balancing_random() -> TestResult {
    // 7.2 TestLoadBalancingRandom: "100 accesses hit all 3 names; after deleting
    // cl0 export, 30 accesses hit exactly 2 names; after deleting cl1 export, 30
    // accesses all cl2." With cl0 broken a start at 0 walks to 1, so cl1 gets 2/3
    // and cl2 1/3; 300 accesses instead of 30 make a miss negligible (< 1e-50).
    let counters = Counters::new();
    let names = |picks: Vec<usize>| picks.into_iter().collect::<HashSet<_>>();

    let got = names(connections(&counters, LbScheme::Random, &[], 100)?);
    assert_eq!(got, HashSet::from([0, 1, 2]));
    let got = names(connections(&counters, LbScheme::Random, &[0], 300)?);
    assert_eq!(got, HashSet::from([1, 2]));
    let got = connections(&counters, LbScheme::Random, &[0, 1], 30)?;
    assert_eq!(got, vec![2; 30]);
    Ok(())
}

#[test]
fn random_never_repeats_a_failed_index_within_a_request() {
    // 3.8 random: "walk forward cyclically to the first index not in failed".
    let mut firsts = HashSet::new();
    for _ in 0..200 {
        let mut cursor = Cursor::new(LbScheme::Random, 5, Arc::default());
        let (picks, err) = all_picks(&mut cursor);
        assert_eq!(err, Error::Exhausted(5));
        let mut sorted = picks.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2, 3, 4], "picks {picks:?}");
        firsts.extend(picks.first().copied());
    }
    assert_eq!(firsts, HashSet::from([0, 1, 2, 3, 4]));
}

#[test]
fn random_walks_forward_past_failed_indexes() -> TestResult {
    let mut cursor = Cursor::new(LbScheme::Random, 4, Arc::default());
    cursor.failed.extend([1, 2, 3]);
    for start in 0..4 {
        assert_eq!(cursor.first_not_failed_from(start)?, 0);
    }
    cursor.failed.insert(0);
    assert_eq!(cursor.first_not_failed_from(2), Err(Error::Exhausted(4)));
    Ok(())
}

#[test]
fn delayed_sources_are_retried_last_in_deferral_order() -> TestResult {
    // 3.7 step 4c + 3.8: unreachable peers are deferred the first time they are
    // picked and retried only after all other sources failed, FIFO.
    // Round-robin over 5 sources on a fresh import starts at 1; 1 and 3 are
    // unreachable, every reachable source denies.
    let mut cursor = Counters::new().cursor(IMPORT, LbScheme::RoundRobin, 5);
    let unreachable = [1, 3];
    let mut picks = Vec::new();
    let err = loop {
        match cursor.select() {
            Ok(index) => {
                picks.push((index, cursor.is_delayed()));
                if unreachable.contains(&index) && !cursor.is_delayed() {
                    cursor.delay();
                }
            }
            Err(err) => break err,
        }
    };
    let want = [
        (1, false),
        (2, false),
        (3, false),
        (4, false),
        (0, false),
        (1, true),
        (3, true),
    ];
    assert_eq!(picks, want);
    assert_eq!(err, Error::Exhausted(5));
    assert_eq!(err.to_string(), "tried out all 5 sources");
    Ok(())
}

#[test]
fn delayed_order_is_deferral_order_not_index_order() -> TestResult {
    // Counter at 1 ⇒ the first pick is 2; 2 and then 0 are deferred, 1 fails.
    let mut cursor = Cursor::new(LbScheme::RoundRobin, 3, Arc::new(Counter::new(1)));
    assert_eq!(cursor.select()?, 2);
    cursor.delay();
    assert_eq!(cursor.select()?, 0);
    cursor.delay();
    assert_eq!(cursor.select()?, 1);
    assert!(!cursor.is_delayed());
    assert_eq!(cursor.select()?, 2);
    assert!(cursor.is_delayed());
    // Deferring again in the delayed phase is ignored (Go would loop forever).
    cursor.delay();
    assert_eq!(cursor.select()?, 0);
    assert_eq!(cursor.select(), Err(Error::Exhausted(3)));
    Ok(())
}

#[test]
fn a_delayed_source_that_succeeds_ends_the_request() -> TestResult {
    // Static primary with failover: the only reachable source 1 denies; the
    // unreachable primary 0 is then used after all (3.8 "IsDelayed() is true, so
    // unreachable peers are used").
    let mut cursor = Cursor::new(LbScheme::Static, 3, Arc::default());
    assert_eq!(cursor.select()?, 0);
    cursor.delay();
    cursor.delay(); // a repeated deferral is ignored
    assert_eq!(cursor.select()?, 1);
    assert_eq!(cursor.select()?, 2);
    assert_eq!(cursor.select()?, 0);
    assert!(cursor.is_delayed());
    assert_eq!(cursor.current(), Some(0));
    Ok(())
}

#[test]
fn random_never_picks_a_delayed_index_before_the_delayed_phase() -> TestResult {
    for _ in 0..100 {
        let mut cursor = Cursor::new(LbScheme::Random, 3, Arc::default());
        let deferred = cursor.select()?;
        cursor.delay();
        let second = cursor.select()?;
        let third = cursor.select()?;
        assert!(second != deferred && third != deferred && second != third);
        assert!(!cursor.is_delayed());
        assert_eq!(cursor.select()?, deferred);
        assert!(cursor.is_delayed());
        assert_eq!(cursor.select(), Err(Error::Exhausted(3)));
    }
    Ok(())
}

#[test]
fn no_sources_is_an_immediate_error() {
    for scheme in [LbScheme::RoundRobin, LbScheme::Random, LbScheme::Static] {
        let counters = Counters::new();
        let mut cursor = counters.cursor(IMPORT, scheme, 0);
        assert_eq!(cursor.select(), Err(Error::Exhausted(0)));
        assert_eq!(cursor.current(), None);
        assert_eq!(counters.counter(IMPORT).load(Ordering::Relaxed), 0);
    }
}

#[test]
fn exhausted_error_names_the_source_count() {
    // 3.7 step 4a: "cannot select import source: tried out all N sources".
    let mut cursor = Cursor::new(LbScheme::RoundRobin, 2, Arc::default());
    let (picks, err) = all_picks(&mut cursor);
    assert_eq!(picks, [1, 0]);
    assert_eq!(err.to_string(), "tried out all 2 sources");
    // Selecting again after exhaustion keeps failing.
    assert_eq!(cursor.select(), Err(Error::Exhausted(2)));
}
