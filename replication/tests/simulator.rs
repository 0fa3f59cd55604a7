//! Scenario S1 (design/DURABILITY.md): the deterministic simulator over many seeds.
//!
//! `seeds` runs a fixed range (seeds 0..N, N = `SIM_SEEDS`, default 1000) so CI is
//! reproducible; `replay` runs the one seed in `SIM_SEED` and prints its event trace.
//! A failing seed panics with the command that replays it.

use trireme_replication::sim;

fn replay_command(seed: u64) -> String {
    format!(
        "SIM_SEED={seed} cargo test --release -p trireme-replication --test simulator -- replay --nocapture"
    )
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn seeds() {
    let n = env_u64("SIM_SEEDS").unwrap_or(1000);
    let first = env_u64("SIM_SEED_START").unwrap_or(0);
    let started = std::time::Instant::now();
    let mut failed = Vec::new();
    for seed in first..first + n {
        let outcome = sim::run(seed, false);
        if !outcome.violations.is_empty() {
            eprintln!("seed {seed} FAILED: {}", outcome.violations.join("\n    "));
            eprintln!("  replay: {}", replay_command(seed));
            failed.push(seed);
        }
    }
    eprintln!("{n} seeds from {first} in {:.1?}", started.elapsed());
    if let Some(seed) = failed.first() {
        panic!(
            "{} of {n} seeds failed ({failed:?}); replay the first with:\n{}",
            failed.len(),
            replay_command(*seed)
        );
    }
}

#[test]
fn replay() {
    let Some(seed) = env_u64("SIM_SEED") else {
        return; // nothing to replay
    };
    let outcome = sim::run(seed, true);
    println!("{}", outcome.summary);
    for v in &outcome.violations {
        println!("VIOLATION {v}");
    }
    assert!(
        outcome.violations.is_empty(),
        "seed {seed} failed; replay: {}",
        replay_command(seed)
    );
}

#[test]
fn one_seed_gives_one_run() {
    let a = sim::run(7, false);
    let b = sim::run(7, false);
    assert_eq!(a.summary, b.summary);
    assert_eq!(a.violations, b.violations);
}
