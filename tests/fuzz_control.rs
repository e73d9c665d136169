//! Fuzz target: the control socket's request lines
//! (`baton::control::parse_request`), what any local client with access to
//! the socket can send the acceptor.
//!
//! Properties, for any line:
//! * no panic (deep nesting included);
//! * an `Ok(request)` serialises to a line that parses to the same
//!   request, and came from a JSON object whose `cmd` is a known command;
//! * for JSON objects built from the request vocabulary, the outcome is the
//!   one a small reference model of the schema predicts (strict: unknown
//!   fields, wrong types and out-of-range numbers are refused);
//! * valid lines mutated byte by byte obey the first two rules.

mod fuzzing;

use std::sync::atomic::{AtomicUsize, Ordering};

use baton::control::{parse_request, Request};
use proptest::prelude::*;
use serde_json::{Map, Value};

const COMMANDS: [&str; 8] = [
    "workers", "status", "metrics", "add", "remove", "restart", "reload", "upgrade",
];

/// The rules every parse must obey, whatever the input.
fn check(line: &[u8]) -> Result<(), TestCaseError> {
    let Ok(req) = parse_request(line) else {
        return Ok(());
    };
    let again = serde_json::to_vec(&req).expect("a request serialises");
    prop_assert_eq!(parse_request(&again).ok(), Some(req.clone()), "{:?}", req);
    let v: Value = serde_json::from_slice(line).expect("accepted line is JSON");
    let cmd = v.get("cmd").and_then(Value::as_str);
    prop_assert!(
        cmd.is_some_and(|c| COMMANDS.contains(&c)),
        "accepted {:?} as {:?}",
        String::from_utf8_lossy(line),
        req
    );
    Ok(())
}

/// What the schema says of a JSON object: the request, or None (refused).
fn model(obj: &Map<String, Value>) -> Option<Request> {
    let cmd = obj.get("cmd")?.as_str()?;
    let others: Vec<&str> = obj
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "cmd")
        .collect();
    let only = |allowed: &[&str]| others.iter().all(|k| allowed.contains(k));
    let u32_of = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    // An optional field: absent or null is None; otherwise it must convert.
    let opt = |k: &str, conv: &dyn Fn(&Value) -> Option<u64>| -> Option<Option<u64>> {
        match obj.get(k) {
            None | Some(Value::Null) => Some(None),
            Some(v) => conv(v).map(Some),
        }
    };
    let as_u32 = |v: &Value| u32_of(v).map(u64::from);
    // `pool`: absent or null is None; a string names one; anything else
    // is refused.
    let pool = || -> Option<Option<String>> {
        match obj.get("pool") {
            None | Some(Value::Null) => Some(None),
            Some(Value::String(s)) => Some(Some(s.clone())),
            Some(_) => None,
        }
    };
    match cmd {
        "workers" if only(&["pool"]) => Some(Request::Workers { pool: pool()? }),
        "status" if others.is_empty() => Some(Request::Status {}),
        "metrics" if others.is_empty() => Some(Request::Metrics {}),
        "restart" if only(&["pool"]) => Some(Request::Restart { pool: pool()? }),
        "reload" if others.is_empty() => Some(Request::Reload {}),
        "upgrade" if only(&["binary"]) => Some(Request::Upgrade {
            binary: match obj.get("binary") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return None,
            },
        }),
        "add" if only(&["count", "pool"]) => Some(Request::Add {
            count: u32_of(obj.get("count")?)?,
            pool: pool()?,
        }),
        "remove" if only(&["id", "count", "drain_timeout_ms", "pool"]) => Some(Request::Remove {
            id: opt("id", &as_u32)?.map(|n| n as u32),
            count: opt("count", &as_u32)?.map(|n| n as u32),
            drain_timeout_ms: opt("drain_timeout_ms", &Value::as_u64)?,
            pool: pool()?,
        }),
        _ => None,
    }
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (0u64..8).prop_map(Value::from),
        prop::sample::select(vec![u64::from(u32::MAX), u64::from(u32::MAX) + 1, u64::MAX,])
            .prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![0.0f64, 1.0, 2.5, -1.0, 1e300]).prop_map(Value::from),
        "[a-z_ ]{0,8}".prop_map(Value::from),
        prop::sample::select(COMMANDS.to_vec()).prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z]{1,3}", inner), 0..3)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Objects in the request's vocabulary: a `cmd` (usually known) and some of
/// its fields, with values of every JSON type.
fn request_object() -> impl Strategy<Value = Map<String, Value>> {
    let key = prop::sample::select(vec![
        "count",
        "id",
        "drain_timeout_ms",
        "pool",
        "binary",
        "extra",
        "Count",
    ]);
    (
        prop_oneof![
            6 => prop::sample::select(COMMANDS.to_vec()).prop_map(Value::from),
            1 => value(),
        ],
        prop::bool::weighted(0.95),
        prop::collection::vec((key, prop_oneof![3 => scalar(), 1 => value()]), 0..4),
    )
        .prop_map(|(cmd, with_cmd, fields)| {
            let mut m = Map::new();
            if with_cmd {
                m.insert("cmd".into(), cmd);
            }
            for (k, v) in fields {
                m.insert(k.to_string(), v);
            }
            m
        })
}

#[test]
fn arbitrary_lines_never_panic() {
    fuzzing::run("control-bytes", 1000, fuzzing::bytes(0..200), |line| {
        check(&line)
    });
}

#[test]
fn request_objects_follow_the_schema() {
    // The generator must produce accepted requests too, or the model is
    // only ever asked about refusals.
    let accepted = AtomicUsize::new(0);
    let total = AtomicUsize::new(0);
    fuzzing::run("control-schema", 2000, request_object(), |obj| {
        let line = serde_json::to_vec(&Value::Object(obj.clone())).expect("json");
        let got = parse_request(&line);
        total.fetch_add(1, Ordering::Relaxed);
        if got.is_ok() {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        prop_assert_eq!(
            got.as_ref().ok().cloned(),
            model(&obj),
            "line {} parsed as {:?}",
            String::from_utf8_lossy(&line),
            got
        );
        check(&line)
    });
    let (a, t) = (accepted.into_inner(), total.into_inner());
    assert!(a * 20 > t, "only {a} of {t} generated requests were valid");
}

#[test]
fn mutated_requests_never_panic() {
    let seeds: Vec<Vec<u8>> = [
        r#"{"cmd":"workers"}"#,
        r#"{"cmd":"status"}"#,
        r#"{"cmd":"add","count":2}"#,
        r#"{"cmd":"remove","id":3,"drain_timeout_ms":30000}"#,
        r#"{"cmd":"remove","count":1,"id":null}"#,
        r#"{ "cmd" : "reload" }"#,
        r#"{"cmd":"metrics","x":[1,{"y":"\u00e9\n"}]}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzzing::run(
        "control-mutated",
        2000,
        fuzzing::mutated(seeds, 6),
        |line| check(&line),
    );
}

/// Deep nesting is refused by serde_json's recursion limit, not by a stack
/// overflow; and duplicate or oversized fields are refused.
#[test]
fn hostile_lines_are_refused() {
    let deep = format!(
        "{{\"cmd\":\"add\",\"count\":{}1{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert!(parse_request(deep.as_bytes()).is_err());
    let deep_obj = "{\"a\":".repeat(50_000);
    assert!(parse_request(deep_obj.as_bytes()).is_err());
    assert!(parse_request(br#"{"cmd":"add","count":1,"count":2}"#).is_err());
    assert!(parse_request(br#"{"cmd":"add","count":4294967296}"#).is_err());
    assert!(parse_request(br#"{"cmd":"add","count":1.0}"#).is_err());
    assert!(parse_request(b"").is_err());
}
