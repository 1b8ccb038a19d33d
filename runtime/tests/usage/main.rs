//! Usage records (spec/api.md API-USAGE-*): the fjall log's bounds, encoding,
//! index, pagination, retention and restart; bad data gets a clear error.
//! `pg.rs`: the PostgreSQL mirror against a real server.
mod pg;

use blyan_runtime::Error;
use blyan_runtime::usage::{
    DEFAULT_RETENTION_MS, LogsConfig, MAX_PAGE_LIMIT, MAX_RECORD_BYTES, MAX_ROUTE_NODES,
    MAX_TEXT_BYTES, RECORD_VERSION, UsageConfig, UsageCursor, UsageLog, UsageQuery, UsageRecord,
    decode_record, encode_record, key_id_of, usage_page_json,
};
use blyan_state_machine::types::Address;
use std::collections::BTreeSet;

/// A record whose fields all derive from `n`, for `key`, at `time_ms`.
pub fn record(n: u64, key: [u8; 32], time_ms: u64) -> UsageRecord {
    let b = (n % 251) as u8;
    UsageRecord {
        request_id: {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&n.to_be_bytes());
            id[8..16].copy_from_slice(&key[..8]);
            id
        },
        key_id: key,
        allowance: (!n.is_multiple_of(3)).then_some([b ^ 0x55; 32]),
        model: format!("qwen3-{n}"),
        prompt_tokens: 10 + n,
        completion_tokens: 3 * n,
        route: (0..(n % 4))
            .map(|i| Address([b.wrapping_add(i as u8); 20]))
            .collect(),
        cost_base_units: u128::from(n) * 1_000_000_000_000_000 + 7,
        latency_ms: 5 * n,
        outcome: ["stop", "length", "cap_reached", "cancelled:stalled"][(n % 4) as usize].into(),
        time_ms,
    }
}

fn open(dir: &std::path::Path) -> UsageLog {
    UsageLog::open(dir, UsageConfig::default()).unwrap()
}

/// Every page of `key`'s records from `since`, following the cursors.
fn all_pages(log: &UsageLog, key: &[u8; 32], since: Option<u64>, limit: usize) -> Vec<Vec<u64>> {
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let page = log.query(key, since, cursor, limit).unwrap();
        assert!(page.records.len() <= limit);
        pages.push(page.records.iter().map(|(s, _)| *s).collect());
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return pages,
        }
        assert!(pages.len() < 10_000, "cursor does not advance");
    }
}

#[test]
fn append_then_query_returns_the_key_holders_records_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let (a, b) = (key_id_of("key-a"), key_id_of("key-b"));
    assert_ne!(a, b);
    let mut mine = Vec::new();
    for n in 0..12u64 {
        let key = if n % 2 == 0 { a } else { b };
        let rec = record(n, key, 1_000 + n);
        let seq = log.append(&rec).unwrap();
        assert_eq!(seq, n, "sequence numbers are dense in append order");
        if key == a {
            mine.push((seq, rec));
        }
    }
    assert_eq!(log.next_seq(), 12);
    let page = log.query(&a, None, None, 100).unwrap();
    mine.reverse();
    assert_eq!(page.records, mine, "only key a's records, newest first");
    assert_eq!(page.next_cursor, None);
    // A key with no records, and the keyless (all-zero) id nobody used here.
    assert!(
        log.query(&key_id_of("key-c"), None, None, 10)
            .unwrap()
            .records
            .is_empty()
    );
    assert!(
        log.query(&[0; 32], None, None, 10)
            .unwrap()
            .records
            .is_empty()
    );
}

#[test]
fn pages_visit_every_record_once_in_time_then_sequence_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let key = key_id_of("pager");
    let other = key_id_of("other");
    // Times out of append order and repeated, interleaved with another key.
    let times = [
        50u64, 10, 10, 30, 70, 10, 50, 20, 90, 90, 90, 40, 60, 80, 30, 10, 20, 70, 5, 95, 25, 25,
        15,
    ];
    let mut expected = Vec::new();
    for (n, t) in times.iter().enumerate() {
        let seq = log.append(&record(n as u64, key, *t)).unwrap();
        expected.push((*t, seq));
        log.append(&record(1000 + n as u64, other, *t)).unwrap();
    }
    expected.sort();
    expected.reverse();
    let want: Vec<u64> = expected.iter().map(|(_, s)| *s).collect();
    for limit in [1, 2, 5, 7, 23, 100] {
        let pages = all_pages(&log, &key, None, limit);
        let got: Vec<u64> = pages.concat();
        assert_eq!(got, want, "limit {limit}");
        let full = pages.iter().filter(|p| p.len() == limit).count();
        assert!(full >= pages.len() - 1, "only the last page may be short");
    }
    // since_ms keeps records with time_ms ≥ since_ms, across pages too.
    let since: Vec<u64> = expected
        .iter()
        .filter(|(t, _)| *t >= 30)
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(all_pages(&log, &key, Some(30), 4).concat(), since);
    assert!(all_pages(&log, &key, Some(96), 4).concat().is_empty());
    // A cursor at or before since_ms: an empty last page.
    let page = log
        .query(
            &key,
            Some(50),
            Some(UsageCursor {
                time_ms: 40,
                seq: 3,
            }),
            10,
        )
        .unwrap();
    assert!(page.records.is_empty() && page.next_cursor.is_none());
}

#[test]
fn page_limits_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let key = key_id_of("k");
    for limit in [0, MAX_PAGE_LIMIT + 1, usize::MAX] {
        match log.query(&key, None, None, limit) {
            Err(Error::BadRequest(m)) => assert!(m.contains("limit"), "{m}"),
            other => panic!("limit {limit}: {other:?}"),
        }
    }
    for n in 0..(MAX_PAGE_LIMIT as u64 + 5) {
        log.append(&record(n, key, n)).unwrap();
    }
    let page = log.query(&key, None, None, MAX_PAGE_LIMIT).unwrap();
    assert_eq!(page.records.len(), MAX_PAGE_LIMIT);
    assert!(page.next_cursor.is_some());
    let rest = log
        .query(&key, None, page.next_cursor, MAX_PAGE_LIMIT)
        .unwrap();
    assert_eq!(rest.records.len(), 5);
    assert_eq!(rest.next_cursor, None);
}

#[test]
fn records_outside_the_bounds_are_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let key = key_id_of("k");
    let ok = record(1, key, 100);
    let mut cases: Vec<(&str, UsageRecord)> = Vec::new();
    let mut r = ok.clone();
    r.model = String::new();
    cases.push(("model", r));
    let mut r = ok.clone();
    r.model = "m".repeat(MAX_TEXT_BYTES + 1);
    cases.push(("model", r));
    let mut r = ok.clone();
    r.outcome = String::new();
    cases.push(("outcome", r));
    let mut r = ok.clone();
    r.outcome = "é".repeat(MAX_TEXT_BYTES / 2 + 1);
    cases.push(("outcome", r));
    let mut r = ok.clone();
    r.route = vec![Address([1; 20]); MAX_ROUTE_NODES + 1];
    cases.push(("route", r));
    for field in [
        "prompt_tokens",
        "completion_tokens",
        "latency_ms",
        "time_ms",
    ] {
        let mut r = ok.clone();
        let v = i64::MAX as u64 + 1;
        match field {
            "prompt_tokens" => r.prompt_tokens = v,
            "completion_tokens" => r.completion_tokens = v,
            "latency_ms" => r.latency_ms = v,
            _ => r.time_ms = v,
        }
        cases.push((field, r));
    }
    for (field, r) in cases {
        match log.append(&r) {
            Err(Error::UsageRecordInvalid(m)) => assert!(m.contains(field), "{field}: {m}"),
            other => panic!("{field}: {other:?}"),
        }
    }
    assert_eq!(log.next_seq(), 0);
    assert!(log.query(&key, None, None, 10).unwrap().records.is_empty());
    // The largest record allowed fits the stated bound and is accepted.
    let mut big = ok.clone();
    big.model = "m".repeat(MAX_TEXT_BYTES);
    big.outcome = "o".repeat(MAX_TEXT_BYTES);
    big.route = vec![Address([2; 20]); MAX_ROUTE_NODES];
    big.allowance = Some([3; 32]);
    big.cost_base_units = u128::MAX;
    big.prompt_tokens = i64::MAX as u64;
    assert_eq!(encode_record(&big).len(), MAX_RECORD_BYTES);
    assert_eq!(log.append(&big).unwrap(), 0);
    assert_eq!(
        log.query(&key, None, None, 10).unwrap().records,
        vec![(0, big)]
    );
}

#[test]
fn encoding_round_trips_and_damaged_bytes_are_refused_with_the_reason() {
    for n in 0..8 {
        let r = record(n, key_id_of("enc"), 12_345 + n);
        let bytes = encode_record(&r);
        assert_eq!(bytes[0], RECORD_VERSION);
        assert_eq!(decode_record(&bytes).unwrap(), r);
        for cut in 0..bytes.len() {
            let e = decode_record(&bytes[..cut]).unwrap_err();
            assert!(e.contains("truncated"), "cut {cut}: {e}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode_record(&long).unwrap_err().contains("trailing"));
        let mut v = bytes.clone();
        v[0] = RECORD_VERSION + 1;
        assert!(decode_record(&v).unwrap_err().contains("version"));
    }
    let r = record(1, key_id_of("enc"), 1); // has an allowance
    let mut v = encode_record(&r);
    v[65] = 2;
    assert!(decode_record(&v).unwrap_err().contains("allowance flag"));
    // The model's first byte: after version, ids, allowance, 4 u64, u128, len.
    let model_at = 1 + 32 + 32 + 1 + 32 + 32 + 16 + 2;
    let mut v = encode_record(&r);
    v[model_at] = 0xff;
    assert!(decode_record(&v).unwrap_err().contains("UTF-8"));
    // A model length field of 0 decodes but is outside API-USAGE-1's bounds.
    let mut r0 = r.clone();
    r0.model = "x".into();
    let mut v = encode_record(&r0);
    v.remove(model_at);
    v[model_at - 1] = 0;
    assert!(decode_record(&v).unwrap_err().contains("model"));
}

#[test]
fn records_survive_a_restart_and_sequence_numbers_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_id_of("restart");
    let now = 100 * DEFAULT_RETENTION_MS;
    {
        let log = open(dir.path());
        for n in 0..5 {
            log.append(&record(n, key, now - DEFAULT_RETENTION_MS - 10 + n))
                .unwrap();
        }
    }
    let log = open(dir.path());
    assert_eq!(log.next_seq(), 5);
    assert_eq!(log.query(&key, None, None, 10).unwrap().records.len(), 5);
    // All of them expire; the next record still gets sequence number 5,
    // also after another restart.
    assert_eq!(log.prune(now).unwrap(), 5);
    drop(log);
    let log = open(dir.path());
    assert_eq!(log.next_seq(), 5);
    assert_eq!(log.append(&record(9, key, now)).unwrap(), 5);
    assert_eq!(log.query(&key, None, None, 10).unwrap().records.len(), 1);
}

#[test]
fn prune_removes_exactly_the_records_older_than_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let retention_ms = 1_000;
    let log = UsageLog::open(dir.path(), UsageConfig { retention_ms }).unwrap();
    let keys = [key_id_of("p1"), key_id_of("p2")];
    // 2,500 records (more than one prune batch) at times 0..2,500.
    for n in 0..2_500u64 {
        log.append(&record(n, keys[(n % 2) as usize], n)).unwrap();
    }
    let now = 3_200; // cutoff 2,200: times 0..2,200 go, 2,200.. stay
    assert_eq!(log.prune(now).unwrap(), 2_200);
    assert_eq!(log.prune(now).unwrap(), 0, "nothing left to prune");
    let mut left = BTreeSet::new();
    for key in &keys {
        for page in all_pages(&log, key, None, 1000) {
            left.extend(page);
        }
    }
    assert_eq!(left, (2_200..2_500).collect::<BTreeSet<u64>>());
    assert!(
        log.metrics_text()
            .contains("blyan_usage_records_pruned_total 2200")
    );
    assert!(
        log.metrics_text()
            .contains("blyan_usage_records_appended_total 2500")
    );
}

#[test]
fn concurrent_appends_get_distinct_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let key = key_id_of("concurrent");
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..25u64)
                    .map(|n| log.append(&record(t * 100 + n, key, n)).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let seqs: BTreeSet<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(seqs, (0..100).collect());
    let listed: BTreeSet<u64> = all_pages(&log, &key, None, 30)
        .concat()
        .into_iter()
        .collect();
    assert_eq!(listed, seqs);
}

#[test]
fn damaged_stores_are_refused_with_a_clear_error() {
    use fjall::{Database, KeyspaceCreateOptions};
    let key = key_id_of("corrupt");
    // A stored record that does not decode: the query names it.
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        log.append(&record(1, key, 10)).unwrap();
    }
    {
        let db = Database::builder(dir.path()).open().unwrap();
        let records = db
            .keyspace("records", KeyspaceCreateOptions::default)
            .unwrap();
        records
            .insert(0u64.to_be_bytes(), vec![RECORD_VERSION, 1, 2])
            .unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let log = open(dir.path());
    match log.query(&key, None, None, 10) {
        Err(Error::Corrupt(m)) => assert!(m.contains("record 0") && m.contains("truncated"), "{m}"),
        other => panic!("{other:?}"),
    }
    drop(log);
    // Another schema version.
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    {
        let db = Database::builder(dir.path()).open().unwrap();
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default).unwrap();
        meta.insert("schema", 99u32.to_be_bytes()).unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    match UsageLog::open(dir.path(), UsageConfig::default()) {
        Err(Error::UnsupportedSchema {
            found: 99,
            supported: 1,
        }) => {}
        other => panic!("{other:?}"),
    }
    // A next_seq behind the stored records.
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        log.append(&record(1, key, 10)).unwrap();
    }
    {
        let db = Database::builder(dir.path()).open().unwrap();
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default).unwrap();
        meta.insert("next_seq", 0u64.to_be_bytes()).unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    match UsageLog::open(dir.path(), UsageConfig::default()) {
        Err(Error::Corrupt(m)) => assert!(m.contains("next_seq"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A zero retention.
    match UsageLog::open(
        tempfile::tempdir().unwrap().path(),
        UsageConfig { retention_ms: 0 },
    ) {
        Err(Error::Config(m)) => assert!(m.contains("retention_ms"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_api_page_shows_records_and_refuses_bad_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let key = key_id_of("api");
    for n in 0..3 {
        log.append(&record(n, key, 100 + n)).unwrap();
    }
    let q = |cursor: Option<&str>, limit: Option<usize>, since_ms: Option<u64>| UsageQuery {
        since_ms,
        cursor: cursor.map(str::to_string),
        limit,
    };
    let v = usage_page_json(&log, &key, q(None, Some(2), None)).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["has_more"], true);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let r = record(2, key, 102);
    assert_eq!(data[0]["seq"], 2);
    assert_eq!(
        data[0]["request_id"],
        format!("0x{}", hex::encode(r.request_id))
    );
    assert_eq!(data[0]["key_id"], format!("0x{}", hex::encode(key)));
    assert_eq!(
        data[0]["allowance"],
        format!("0x{}", hex::encode(r.allowance.unwrap()))
    );
    assert_eq!(data[0]["model"], r.model);
    assert_eq!(data[0]["prompt_tokens"], r.prompt_tokens);
    assert_eq!(data[0]["completion_tokens"], r.completion_tokens);
    assert_eq!(
        data[0]["total_tokens"],
        r.prompt_tokens + r.completion_tokens
    );
    assert_eq!(data[0]["route"].as_array().unwrap().len(), r.route.len());
    assert_eq!(data[0]["cost"], r.cost_base_units.to_string());
    assert_eq!(data[0]["outcome"], r.outcome);
    assert_eq!(data[0]["time_ms"], 102);
    let cursor = v["next_cursor"].as_str().unwrap().to_string();
    let v = usage_page_json(&log, &key, q(Some(&cursor), None, None)).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["seq"], 0);
    assert_eq!(v["data"][0]["allowance"], serde_json::Value::Null);
    assert_eq!(v["has_more"], false);
    assert_eq!(v["next_cursor"], serde_json::Value::Null);
    for (cursor, limit) in [
        (Some("xyz"), None),
        (Some(&"g".repeat(32)[..]), None),
        (None, Some(0)),
        (None, Some(1001)),
    ] {
        let e = usage_page_json(&log, &key, q(cursor, limit, None)).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{e:?}");
        assert_eq!(e.reason, "bad_query");
    }
    // The cursor's text form round-trips.
    let c = UsageCursor {
        time_ms: u64::MAX,
        seq: 7,
    };
    assert_eq!(c.to_string().parse::<UsageCursor>().unwrap(), c);
}

#[test]
fn the_logs_table_of_the_node_configuration() {
    let base = "chain_id = \"c\"\ngenesis_file = \"g\"\ndata_dir = \"d\"\nkey_file = \"k\"\n";
    let c = blyan_runtime::config::FileConfig::parse(base).unwrap();
    assert_eq!(c.logs, LogsConfig::default());
    assert_eq!(c.logs.retention_ms, 30 * 24 * 3600 * 1000);
    let c = blyan_runtime::config::FileConfig::parse(&format!(
        "{base}[logs]\npostgres_url = \"host=/tmp/pg port=5433 user=blyan dbname=blyan\"\nretention_ms = 60000\n"
    ))
    .unwrap();
    assert_eq!(c.logs.retention_ms, 60_000);
    assert!(c.logs.postgres_url.is_some());
    assert_eq!(
        blyan_runtime::config::FileConfig::parse(&c.to_toml())
            .unwrap()
            .logs,
        c.logs
    );
    for (bad, says) in [
        ("[logs]\nretention_ms = 0\n", "retention_ms"),
        (
            "[logs]\npostgres_url = \"host=/tmp port=notaport\"\n",
            "postgres_url",
        ),
        ("[logs]\nsink = \"x\"\n", "sink"),
    ] {
        match blyan_runtime::config::FileConfig::parse(&format!("{base}{bad}")) {
            Err(Error::Config(m)) => assert!(m.contains(says), "{bad}: {m}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
}
