//! API-USAGE-5 against a real PostgreSQL server (Debian's `postgresql`
//! package; `tests/setup-system` installs it). The test initdb's a private
//! cluster in a temporary directory and runs it as `nobody` when the tests
//! run as root (PostgreSQL refuses root), on a unix socket in that
//! directory, with no TCP listener; it stops it at the end (and on a panic).
//!
//! Records appended reach PostgreSQL; with the server stopped (`pg_ctl stop
//! -m immediate`) appends still succeed and the mirror counts failures; once
//! it is back every record is in the table exactly once, and a rewound
//! cursor re-sends all of them without a duplicate row.
use super::record;
use blyan_runtime::usage::{
    MirrorOptions, UsageConfig, UsageLog, UsageRecord, key_id_of, spawn_postgres_mirror,
};
use blyan_state_machine::types::Address;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(90);

/// The newest `/usr/lib/postgresql/<version>/bin` holding the server.
fn pg_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            ["initdb", "pg_ctl", "postgres"]
                .iter()
                .all(|b| bin.join(b).is_file())
                .then_some((v, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under \
             /usr/lib/postgresql/<version>/bin: install Debian's postgresql package \
             (tests/setup-system does)"
        ),
    }
}

/// A private PostgreSQL cluster; stopped (immediately) when dropped.
struct Pg {
    _dir: tempfile::TempDir,
    bin: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    as_nobody: bool,
}

impl Pg {
    fn command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        if self.as_nobody {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self
            .command(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed ({}):\n{}{}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn init() -> Pg {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("blyan-pg")
            .tempdir()
            .unwrap();
        let as_nobody = rustix::process::geteuid().is_root();
        if as_nobody {
            let out = Command::new("id").args(["-u", "nobody"]).output().unwrap();
            let uid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            let out = Command::new("id").args(["-g", "nobody"]).output().unwrap();
            let gid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let pg = Pg {
            bin,
            data: dir.path().join("data"),
            socket_dir: dir.path().to_path_buf(),
            log: dir.path().join("server.log"),
            _dir: dir,
            as_nobody,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                pg.data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        pg
    }

    fn start(&self) {
        let opts = format!(
            "-k {} -c listen_addresses='' -c fsync=off -p 5432",
            self.socket_dir.display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-l",
                self.log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    fn stop_immediately(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    fn url(&self) -> String {
        format!(
            "host={} port=5432 user=postgres dbname=postgres",
            self.socket_dir.display()
        )
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args([
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < DEADLINE,
            "not within {DEADLINE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The table's rows as records, by sequence number, with the node column.
async fn rows(url: &str) -> Vec<(i64, Vec<u8>, UsageRecord)> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test's PostgreSQL");
    let conn = tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT seq, node, request_id, key_id, allowance, model, prompt_tokens, \
             completion_tokens, route, cost_base_units::TEXT, latency_ms, outcome, time_ms \
             FROM blyan_usage ORDER BY seq",
            &[],
        )
        .await
        .unwrap();
    conn.abort();
    let arr = |v: Vec<u8>| -> [u8; 32] { v.try_into().expect("32 bytes") };
    rows.into_iter()
        .map(|r| {
            let route: Vec<Vec<u8>> = r.get(8);
            let cost: String = r.get(9);
            (
                r.get::<_, i64>(0),
                r.get::<_, Vec<u8>>(1),
                UsageRecord {
                    request_id: arr(r.get(2)),
                    key_id: arr(r.get(3)),
                    allowance: r.get::<_, Option<Vec<u8>>>(4).map(arr),
                    model: r.get(5),
                    prompt_tokens: r.get::<_, i64>(6) as u64,
                    completion_tokens: r.get::<_, i64>(7) as u64,
                    route: route
                        .into_iter()
                        .map(|a| Address(a.try_into().expect("20 bytes")))
                        .collect(),
                    cost_base_units: cost.parse().expect("a decimal"),
                    latency_ms: r.get::<_, i64>(10) as u64,
                    outcome: r.get(11),
                    time_ms: r.get::<_, i64>(12) as u64,
                },
            )
        })
        .collect()
}

fn assert_exactly(rows: &[(i64, Vec<u8>, UsageRecord)], want: &[UsageRecord], node: &Address) {
    assert_eq!(rows.len(), want.len(), "one row per record, no more");
    for (i, ((seq, n, got), want)) in rows.iter().zip(want).enumerate() {
        assert_eq!(*seq, i as i64);
        assert_eq!(n[..], node.0[..]);
        assert_eq!(got, want, "row {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_mirror_loses_nothing_and_duplicates_nothing_across_an_outage() {
    let pg = Pg::init();
    pg.start();
    let dir = tempfile::tempdir().unwrap();
    let log = UsageLog::open(&dir.path().join("usage"), UsageConfig::default()).unwrap();
    let node = Address([0xab; 20]);
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut opts = MirrorOptions::new(pg.url(), node);
    opts.retry_max_ms = 500;
    let mirror = spawn_postgres_mirror(log.clone(), opts, stop_rx).unwrap();

    let key = key_id_of("pg-test");
    let mut want = Vec::new();
    let append = |want: &mut Vec<UsageRecord>, n: u64| {
        let mut r = record(
            n,
            if n.is_multiple_of(5) { [0; 32] } else { key },
            1_700_000_000_000 + n,
        );
        if n == 7 {
            r.cost_base_units = u128::MAX; // NUMERIC(39, 0) holds it
        }
        log.append(&r)
            .expect("append succeeds whatever PostgreSQL does");
        want.push(r);
    };

    // Up: records reach the table.
    for n in 0..60 {
        append(&mut want, n);
    }
    eventually("the first 60 records mirrored", || log.mirror_lag() == 0).await;
    assert!(log.mirror_up());
    assert_exactly(&rows(&pg.url()).await, &want, &node);

    // Down: appends keep succeeding, the mirror fails and retries.
    pg.stop_immediately();
    let failures = log.mirror_failures_total();
    for n in 60..100 {
        append(&mut want, n);
    }
    eventually("the mirror noticed the outage", || {
        log.mirror_failures_total() > failures && !log.mirror_up()
    })
    .await;
    assert_eq!(log.mirror_lag(), 40, "nothing mirrored while down");
    assert!(
        log.metrics_text()
            .contains("blyan_usage_mirror_lag_records 40")
    );

    // Back: every record, exactly once.
    pg.start();
    for n in 100..110 {
        append(&mut want, n);
    }
    eventually("all 110 records mirrored after the restart", || {
        log.mirror_lag() == 0
    })
    .await;
    assert_exactly(&rows(&pg.url()).await, &want, &node);

    // Re-sent from the start (as after a crash before the cursor write):
    // still one row per record.
    let sent = log.mirrored_total();
    log.rewind_mirror(0).unwrap();
    eventually("the rewound records re-sent", || {
        log.mirror_lag() == 0 && log.mirrored_total() >= sent + 110
    })
    .await;
    assert_exactly(&rows(&pg.url()).await, &want, &node);
    assert!(log.metrics_text().contains("blyan_usage_mirror_up 1"));

    mirror.abort();
    let _ = mirror.await;
    pg.stop_immediately();
}
