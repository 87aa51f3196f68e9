//! Reads: stream pages in both directions, time travel, the global log.

use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use crate::both_backends;
use crate::common::{Backend, TestApp, batch, deposit};

both_backends!(
    stream_pages_forward_and_backward,
    as_of_shows_the_stream_as_it_was,
    global_log_pages_in_position_order
);

fn versions(page: &Value) -> Vec<u64> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect()
}

async fn stream_pages_forward_and_backward(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok(
        "s",
        &batch(
            (0..5)
                .map(|i| deposit(Uuid::new_v4(), "c", &i.to_string()))
                .collect(),
        ),
    )
    .await;

    let p: Value = app.read("s", "limit=2").await.json().await.unwrap();
    assert_eq!(
        (
            versions(&p),
            p["next"].as_u64(),
            p["current_version"].as_u64()
        ),
        (vec![1, 2], Some(3), Some(5))
    );
    let p: Value = app.read("s", "limit=2&from=3").await.json().await.unwrap();
    assert_eq!((versions(&p), p["next"].as_u64()), (vec![3, 4], Some(5)));
    let p: Value = app.read("s", "limit=2&from=5").await.json().await.unwrap();
    assert_eq!((versions(&p), p["next"].as_u64()), (vec![5], None));

    let p: Value = app
        .read("s", "direction=backward&limit=2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!((versions(&p), p["next"].as_u64()), (vec![5, 4], Some(3)));
    let p: Value = app
        .read("s", "direction=backward&limit=3&from=3")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!((versions(&p), p["next"].as_u64()), (vec![3, 2, 1], None));
    let p: Value = app
        .read("s", "direction=backward")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(versions(&p), vec![5, 4, 3, 2, 1]);

    assert_eq!(
        app.read("unknown", "").await.status(),
        StatusCode::NOT_FOUND
    );
    for bad in [
        "limit=0",
        "limit=1001",
        "direction=sideways",
        "from=-1",
        "from=x",
        "as_of=yesterday",
        "colour=red",
    ] {
        let r = app.read("s", bad).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
}

async fn as_of_shows_the_stream_as_it_was(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok("s", &batch(vec![deposit(Uuid::new_v4(), "c", "1")]))
        .await;
    let first: Value = app.read("s", "").await.json().await.unwrap();
    let t1 = first["events"][0]["recorded_at"]
        .as_str()
        .unwrap()
        .to_owned();
    app.append_ok(
        "s",
        &batch(vec![
            deposit(Uuid::new_v4(), "c", "2"),
            deposit(Uuid::new_v4(), "c", "3"),
        ]),
    )
    .await;

    let q = format!("as_of={}", urlencode(&t1));
    let then: Value = app.read("s", &q).await.json().await.unwrap();
    assert_eq!(
        (versions(&then), then["current_version"].as_u64()),
        (vec![1], Some(1))
    );
    let back: Value = app
        .read("s", &format!("{q}&direction=backward"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(versions(&back), vec![1]);
    let log: Value = app.log(&q).await.json().await.unwrap();
    assert_eq!(log["events"].as_array().unwrap().len(), 1);
    let now: Value = app.read("s", "").await.json().await.unwrap();
    assert_eq!(versions(&now), vec![1, 2, 3]);
    assert_eq!(
        app.read("s", "as_of=2000-01-01T00:00:00Z").await.status(),
        StatusCode::NOT_FOUND,
        "no stream then"
    );
}

fn urlencode(s: &str) -> String {
    s.replace(':', "%3A").replace('+', "%2B")
}

async fn global_log_pages_in_position_order(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    for s in ["a", "b", "a", "c"] {
        app.append_ok(
            s,
            &batch(vec![
                deposit(Uuid::new_v4(), "c", "1"),
                deposit(Uuid::new_v4(), "d", "2"),
            ]),
        )
        .await;
    }
    let p: Value = app.log("after=0&limit=3").await.json().await.unwrap();
    let positions: Vec<u64> = p["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!((positions, p["next"].as_u64()), (vec![1, 2, 3], Some(3)));
    let all = app.whole_log().await;
    let streams: Vec<&str> = all
        .iter()
        .map(|e| e["stream_id"].as_str().unwrap())
        .collect();
    assert_eq!(streams, ["a", "a", "b", "b", "a", "a", "c", "c"]);
    assert!(all.iter().all(|e| e["personal_data"] == "decrypted"));
    let tail: Value = app.log("after=8").await.json().await.unwrap();
    assert_eq!(
        (
            tail["events"].as_array().unwrap().len(),
            tail["next"].as_u64()
        ),
        (0, Some(8))
    );
    assert_eq!(app.log("after=-1").await.status(), StatusCode::BAD_REQUEST);
}
