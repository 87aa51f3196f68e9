//! Live subscriptions (Server-Sent Events): catch-up then live without a
//! gap or a duplicate, resumption with `Last-Event-ID`, one stream, what
//! each role sees, forgets, the audit records of a subscription, a client
//! that stops reading, shutdown, and (PostgreSQL) commits of another process.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{
    Backend, ServerProcess, TestApp, TestEnv, assert_no_personal_value, batch, deposit,
};
use crate::{both_backends, postgres_only};
use eventvault_tools::sse::{SseEvent, SseParser};

both_backends!(
    a_subscription_catches_up_then_follows_live_without_gap_or_duplicate,
    a_stream_subscription_follows_one_stream,
    a_subscriber_sees_what_its_role_may_read,
    a_subscription_is_audited_when_it_opens_discloses_and_closes,
    a_client_that_stops_reading_is_cut_off_and_resumes,
    subscriptions_end_when_the_service_stops,
    a_batch_whose_disclosure_cannot_be_audited_is_not_sent,
    a_removed_principals_subscription_ends,
    a_subscription_whose_caller_cannot_be_checked_again_ends,
    subscriptions_beyond_the_limit_are_refused,
    events_read_before_a_forget_but_not_yet_sent_are_read_again,
);

// Several processes share one database only on PostgreSQL.
postgres_only!(
    a_commit_by_another_process_reaches_a_subscriber,
    a_forget_recorded_by_another_process_reaches_live_subscribers,
);

/// The longest a test waits for an event before it fails.
const PATIENCE: Duration = Duration::from_secs(20);

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>;

/// An open subscription, read event by event.
pub struct Subscriber {
    body: Body,
    parser: SseParser,
    ready: VecDeque<SseEvent>,
}

impl Subscriber {
    /// Opens `path` and insists on a 200 `text/event-stream`.
    pub async fn open(app: &TestApp, path: &str, token: &str, headers: &[(&str, &str)]) -> Self {
        let (status, sub) = Self::try_open(app, path, token, headers).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        sub.expect("an event stream")
    }

    /// Opens `path`: the status, and the subscription when it is 200.
    pub async fn try_open(
        app: &TestApp,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Option<Self>) {
        let mut req = app
            .client
            .get(format!("{}{path}", app.base))
            .bearer_auth(token);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.expect("request");
        let status = r.status();
        if status != StatusCode::OK {
            return (status, None);
        }
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        let sub = Self {
            body: Box::pin(r.bytes_stream()),
            parser: SseParser::default(),
            ready: VecDeque::new(),
        };
        (status, Some(sub))
    }

    /// The next event: its `id:` and its JSON. Fails the test after
    /// [`PATIENCE`] without one, or if the stream ends.
    pub async fn next(&mut self) -> (u64, Value) {
        match tokio::time::timeout(PATIENCE, self.next_or_end()).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("the subscription ended"),
            Err(_) => panic!("no event within {PATIENCE:?}"),
        }
    }

    /// The next event, or `None` when the stream ends (or fails).
    pub async fn next_or_end(&mut self) -> Option<(u64, Value)> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                let id = e.id.expect("every event has an id").parse().unwrap();
                return Some((id, serde_json::from_str(&e.data).unwrap()));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.ready.extend(self.parser.push(&chunk)),
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn take(&mut self, n: usize) -> Vec<(u64, Value)> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await);
        }
        out
    }
}

/// `n` deposits about `subject`.
fn deposits(subject: &str, n: usize) -> Value {
    batch(
        (0..n)
            .map(|i| deposit(Uuid::new_v4(), subject, &format!("{i}.25")))
            .collect(),
    )
}

/// Waits until `sub` ends, with no further event, and returns the audit
/// record of its closing.
pub async fn ended_and_recorded(app: &TestApp, sub: &mut Subscriber) -> Value {
    assert!(
        tokio::time::timeout(PATIENCE, sub.next_or_end())
            .await
            .expect("the subscription ended")
            .is_none()
    );
    eventually_recorded(app, "action=log.subscribe.close", |_| true).await
}

/// Waits until the audit log holds a record matching `query` for which
/// `found` holds (records written after a response, like a subscription's
/// close, appear a moment later); fails after [`PATIENCE`]. It looks again
/// only when the application has committed a new audit record.
pub async fn eventually_recorded(
    app: &TestApp,
    query: &str,
    found: impl Fn(&Value) -> bool,
) -> Value {
    let mut head = app.progress().audit_head;
    let looked = tokio::time::timeout(PATIENCE, async {
        loop {
            // Every record up to `seen` is committed, so the listing below
            // sees it.
            let seen = *head.borrow_and_update();
            let records = app.audit_records(query).await;
            // Each page of the listing (1000 records; a short one ends it)
            // is recorded too, before its response leaves.
            let own = records.len() as u64 / 1000 + 1;
            if let Some(r) = records.into_iter().find(&found) {
                return r;
            }
            // Look again once a record beyond those has committed.
            head.wait_for(|h| *h > seen + own)
                .await
                .expect("the application runs");
        }
    })
    .await;
    looked.unwrap_or_else(|_| panic!("no audit record for {query} within {PATIENCE:?}"))
}

async fn a_subscription_catches_up_then_follows_live_without_gap_or_duplicate(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    for i in 0..3 {
        app.append_ok(&format!("accounts-{i}"), &deposits("cust-1", 10))
            .await;
    }
    let mut sub = Subscriber::open(&app, "/events/subscribe?after=0", &app.token(), &[]).await;
    // Appends keep coming while the subscriber catches up and goes live.
    let writer = {
        let client = app.client.clone();
        let (base, token) = (app.base.clone(), app.token());
        tokio::spawn(async move {
            for _ in 0..5 {
                let r = client
                    .post(format!("{base}/streams/accounts-live/events"))
                    .bearer_auth(&token)
                    .json(&deposits("cust-2", 10))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::CREATED);
            }
        })
    };
    let got = sub.take(80).await;
    writer.await.unwrap();
    let ids: Vec<u64> = got.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=80).collect::<Vec<_>>(), "no gap, no duplicate");
    for (id, e) in &got {
        assert_eq!(e["position"], *id);
        assert_eq!(e["personal_data"], "decrypted");
    }
    let live: Vec<&Value> = got
        .iter()
        .map(|(_, e)| e)
        .filter(|e| e["stream_id"] == "accounts-live")
        .collect();
    assert_eq!(live.len(), 50);
    // Nothing more is pending: the next event is the next append.
    app.append_ok("accounts-0", &deposits("cust-1", 1)).await;
    assert_eq!(sub.next().await.0, 81);

    // Last-Event-ID resumes after that event and wins over `after`.
    let mut resumed = Subscriber::open(
        &app,
        "/events/subscribe?after=5",
        &app.token(),
        &[("Last-Event-ID", "40")],
    )
    .await;
    let ids: Vec<u64> = resumed.take(41).await.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (41..=81).collect::<Vec<_>>());

    let (status, text) = app
        .request(Method::GET, "/events/subscribe")
        .token(&app.token())
        .header("Last-Event-ID", "seven")
        .send()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("Last-Event-ID"), "{text}");
    let (status, _) = app.get("/events/subscribe?after=-1", &app.token()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn a_stream_subscription_follows_one_stream(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok("accounts-a", &deposits("cust-1", 5)).await;
    app.append_ok("accounts-b", &deposits("cust-1", 5)).await;
    // `id:` is the stream version; `from` is the first version sent.
    let mut sub = Subscriber::open(
        &app,
        "/streams/accounts-a/subscribe?from=3",
        &app.token(),
        &[],
    )
    .await;
    let first = sub.take(3).await;
    assert_eq!(
        first.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    app.append_ok("accounts-b", &deposits("cust-1", 2)).await;
    app.append_ok("accounts-a", &deposits("cust-1", 2)).await;
    let live = sub.take(2).await;
    for (id, e) in &live {
        assert_eq!(e["stream_id"], "accounts-a");
        assert_eq!(e["version"], *id);
    }
    assert_eq!(live[0].0, 6);
    // Resumed after version 6.
    let mut resumed = Subscriber::open(
        &app,
        "/streams/accounts-a/subscribe",
        &app.token(),
        &[("Last-Event-ID", "6")],
    )
    .await;
    assert_eq!(resumed.next().await.0, 7);
    // A stream that does not exist yet is followed until it does.
    let mut later =
        Subscriber::open(&app, "/streams/accounts-new/subscribe", &app.token(), &[]).await;
    app.append_ok("accounts-new", &deposits("cust-3", 1)).await;
    let (id, e) = later.next().await;
    assert_eq!((id, e["stream_id"].as_str()), (1, Some("accounts-new")));
    // Invalid ids are refused.
    let (status, _) = app.get("/streams/bad%20id/subscribe", &app.token()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn a_subscriber_sees_what_its_role_may_read(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok("accounts-7", &deposits("cust-7", 3)).await; // 1..=3
    app.append_ok("loans-7", &deposits("cust-7", 1)).await; // 4
    let service = app.env.add_principal("ledger", &["service"]).await;
    let support = app.env.add_principal("helpdesk", &["support"]).await;
    let dpo = app.env.add_principal("privacy", &["dpo"]).await;

    // The service role: its streams only, personal data redacted.
    let mut sub = Subscriber::open(&app, "/events/subscribe", &service, &[]).await;
    for (_, e) in sub.take(3).await {
        assert_eq!(e["personal_data"], "redacted");
        assert!(e["data"]["amount"].is_string());
        assert_no_personal_value(e.to_string());
    }
    app.append_ok("accounts-7", &deposits("cust-8", 1)).await; // 5
    let (id, e) = sub.next().await;
    assert_eq!(id, 5, "the loans event is not sent to the service role");
    assert_eq!(e["stream_id"], "accounts-7");
    let (status, _) = Subscriber::try_open(&app, "/streams/loans-7/subscribe", &service, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The support role needs a purpose, then sees personal data.
    let (status, _) = Subscriber::try_open(&app, "/events/subscribe", &support, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let mut sub = Subscriber::open(
        &app,
        "/events/subscribe",
        &support,
        &[("X-Purpose", "ticket 4711")],
    )
    .await;
    let (_, e) = sub.next().await;
    assert_eq!(e["personal_data"], "decrypted");
    assert_eq!(e["data"]["payer_name"], "Payer of cust-7");

    let caught_up = sub.take(4).await;
    assert_eq!(caught_up.last().unwrap().0, 5);

    // After a forget, the subject's events are erased for every new
    // subscriber; the amounts stay.
    crate::forget::forget_ok(&app, &dpo, "cust-7").await;
    let mut after = Subscriber::open(&app, "/events/subscribe", &app.token(), &[]).await;
    for (id, e) in after.take(5).await {
        let expected = if id == 5 { "decrypted" } else { "erased" };
        assert_eq!(e["personal_data"], expected, "event {id}");
        assert!(e["data"]["amount"].is_string());
        if id != 5 {
            assert_no_personal_value(e.to_string());
        }
    }
    // The live support subscription goes on, past the `$subjects` event
    // its `*` grant does not cover.
    app.append_ok("accounts-9", &deposits("cust-9", 1)).await; // 7
    let (id, e) = sub.next().await;
    assert_eq!(id, 7);
    assert_eq!(e["data"]["payer_name"], "Payer of cust-9");
}

async fn a_subscription_is_audited_when_it_opens_discloses_and_closes(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok("accounts-1", &deposits("cust-1", 5)).await;
    let service = app.env.add_principal("ledger", &["service"]).await;

    let mut sub = Subscriber::open(
        &app,
        "/events/subscribe",
        &app.token(),
        &[("X-Correlation-Id", "corr-sub"), ("X-Purpose", "reconcile")],
    )
    .await;
    assert_eq!(sub.take(5).await.len(), 5);
    drop(sub);
    let opened = app.audit_records("action=log.subscribe").await;
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(opened[0]["outcome"], "ok");
    assert_eq!(opened[0]["principal"], "admin");
    assert_eq!(opened[0]["correlation_id"], "corr-sub");
    assert_eq!(opened[0]["resource"], "positions:>0");
    let delivered = app.audit_records("action=log.subscribe.deliver").await;
    assert_eq!(delivered.len(), 1, "one record per batch: {delivered:?}");
    let d = &delivered[0];
    assert_eq!(
        (d["personal_data"].as_bool(), d["event_count"].as_u64()),
        (Some(true), Some(5))
    );
    assert_eq!(d["resource"], "positions:1-5");
    assert_eq!(d["purpose"], "reconcile");
    assert_eq!(d["correlation_id"], "corr-sub");
    let closed = eventually_recorded(&app, "action=log.subscribe.close", |_| true).await;
    assert_eq!(closed["event_count"], 5);
    assert_eq!(closed["personal_data"], true);
    assert_eq!(closed["correlation_id"], "corr-sub");

    // Redacted deliveries disclose nothing: no per-batch record, and the
    // close says so.
    let mut sub = Subscriber::open(&app, "/streams/accounts-1/subscribe", &service, &[]).await;
    assert_eq!(sub.take(5).await.len(), 5);
    drop(sub);
    let closed = eventually_recorded(
        &app,
        "action=stream.subscribe.close&principal=ledger",
        |_| true,
    )
    .await;
    assert_eq!(closed["resource"], "stream:accounts-1");
    assert_eq!(closed["event_count"], 5);
    assert_eq!(closed["personal_data"], false);
    assert!(
        app.audit_records("action=stream.subscribe.deliver")
            .await
            .is_empty()
    );
    // The chain holds with all of them.
    let (status, text) = app.get("/audit/verify", &app.token()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["ok"], true);
}

async fn a_client_that_stops_reading_is_cut_off_and_resumes(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.write_timeout = Duration::from_secs(1));
    let app = TestApp::start(env).await;
    // Far more than the socket buffers of both ends hold.
    let filler = "x".repeat(10_000);
    let big = |n: usize| {
        batch(
            (0..n)
                .map(|_| json!({"type": "Note", "data": {"text": filler}}))
                .collect(),
        )
    };
    let mut sub = Subscriber::open(&app, "/events/subscribe", &app.token(), &[]).await;
    // It reads one event, then stops reading.
    app.append_ok("notes-1", &big(1)).await;
    assert_eq!(sub.next().await.0, 1);
    for _ in 0..40 {
        app.append_ok("notes-1", &big(100)).await;
    }
    let total = 4001;
    // The server gave up on it: the close is recorded while the client
    // still has not read.
    let closed = eventually_recorded(&app, "action=log.subscribe.close", |_| true).await;
    let sent = closed["event_count"].as_u64().unwrap();
    assert!(sent < total, "cut off before the end: {closed}");
    // What it reads now is a gapless prefix, then the end of the stream.
    let mut last = 1;
    while let Some((id, _)) = sub.next_or_end().await {
        assert_eq!(id, last + 1);
        last = id;
    }
    assert!(last < total, "the stream ended early, at {last}");
    // It resumes where it stopped.
    let last_id = last.to_string();
    let mut resumed = Subscriber::open(
        &app,
        "/events/subscribe",
        &app.token(),
        &[("Last-Event-ID", &last_id)],
    )
    .await;
    assert_eq!(resumed.next().await.0, last + 1);
}

async fn subscriptions_end_when_the_service_stops(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok("accounts-1", &deposits("cust-1", 1)).await;
    let mut sub = Subscriber::open(&app, "/events/subscribe", &app.token(), &[]).await;
    assert_eq!(sub.next().await.0, 1);
    // A graceful stop does not wait for the subscriber to leave.
    tokio::time::timeout(PATIENCE, app.stop())
        .await
        .expect("the service stopped with a subscriber connected");
    assert!(sub.next_or_end().await.is_none());
    // The close was recorded before the store closed.
    let app = TestApp::start(app.env.clone()).await;
    let closed = app.audit_records("action=log.subscribe.close").await;
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0]["event_count"], 1);
}

async fn a_commit_by_another_process_reaches_a_subscriber(backend: Backend) {
    let here = TestApp::spawn(&backend).await;
    let other = ServerProcess::start(&here.env)
        .await
        .expect("second process");
    let there = TestApp::client_for(here.env.clone(), other.base.clone());
    let mut sub = Subscriber::open(&here, "/events/subscribe", &here.token(), &[]).await;
    // Appended through the other process: only its NOTIFY can wake this
    // process's subscribers.
    for round in 1..=3u64 {
        there.append_ok("accounts-1", &deposits("cust-1", 1)).await;
        let (id, e) = sub.next().await;
        assert_eq!(id, round);
        assert_eq!(e["personal_data"], "decrypted");
    }
    other.terminate().await;
}

async fn a_batch_whose_disclosure_cannot_be_audited_is_not_sent(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok("accounts-1", &deposits("cust-1", 1)).await;
    let mut sub = Subscriber::open(&app, "/events/subscribe", &app.token(), &[]).await;
    assert_eq!(sub.next().await.0, 1);
    // From now on the audit log refuses disclosure records (and only them).
    let db = crate::at_rest::events_db(&app.env).await;
    match &db {
        eventvault::store::Db::Sqlite(_) => crate::at_rest::exec(
            &db,
            "create trigger no_disclosure before insert on audit_log
             when new.action = 'log.subscribe.deliver'
             begin select raise(abort, 'refused'); end",
        )
        .await
        .unwrap(),
        eventvault::store::Db::Postgres(_) => {
            crate::at_rest::exec(
                &db,
                "create function no_disclosure() returns trigger language plpgsql as
                 $$ begin
                   if new.action = 'log.subscribe.deliver' then raise exception 'refused'; end if;
                   return new;
                 end; $$",
            )
            .await
            .unwrap();
            crate::at_rest::exec(
                &db,
                "create trigger no_disclosure before insert on audit_log
                 for each row execute function no_disclosure()",
            )
            .await
            .unwrap()
        }
    };
    app.append_ok("accounts-1", &deposits("cust-1", 1)).await;
    // The event is not sent: the subscription ends instead.
    let closed = ended_and_recorded(&app, &mut sub).await;
    assert_eq!(closed["outcome"], "error");
    assert_eq!(
        closed["event_count"], 1,
        "only the first event was delivered"
    );
}

async fn a_removed_principals_subscription_ends(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.subscription_recheck = Duration::from_millis(500));
    let app = TestApp::start(env).await;
    let service = app.env.add_principal("ledger", &["service"]).await;
    app.append_ok("accounts-1", &deposits("cust-1", 1)).await;
    let mut sub = Subscriber::open(&app, "/events/subscribe", &service, &[]).await;
    assert_eq!(sub.next().await.0, 1);
    crate::common::run_ok(&app.env, &["principal", "remove", "ledger"]).await;
    // Within the authentication cache's lifetime and one re-check, with
    // nothing appended meanwhile.
    let closed = ended_and_recorded(&app, &mut sub).await;
    assert_eq!(closed["outcome"], "denied");
    assert_eq!(closed["principal"], "ledger");
}

/// Fails closed: when the principals cannot be read at a re-check (here the
/// table is renamed away under the running service, so that every look-up
/// fails in the database), the subscription ends instead of keeping grants
/// it can no longer confirm; its close record says `error`.
async fn a_subscription_whose_caller_cannot_be_checked_again_ends(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.subscription_recheck = Duration::from_millis(500));
    let app = TestApp::start(env).await;
    let service = app.env.add_principal("ledger", &["service"]).await;
    app.append_ok("accounts-1", &deposits("cust-1", 1)).await;
    let mut sub = Subscriber::open(&app, "/events/subscribe", &service, &[]).await;
    assert_eq!(sub.next().await.0, 1);
    let db = crate::at_rest::events_db(&app.env).await;
    crate::at_rest::exec(&db, "alter table principals rename to principals_away")
        .await
        .unwrap();
    // Within the authentication cache's lifetime and one re-check, with
    // nothing appended meanwhile.
    let ended = tokio::time::timeout(PATIENCE, sub.next_or_end()).await;
    crate::at_rest::exec(&db, "alter table principals_away rename to principals")
        .await
        .unwrap();
    assert!(
        ended.expect("the subscription ended").is_none(),
        "nothing was appended"
    );
    crate::common::wait_for_log_lines(
        &["could not authenticate a subscriber again; the subscription ends"],
        1,
        PATIENCE,
    )
    .await;
    let closed = eventually_recorded(&app, "action=log.subscribe.close", |_| true).await;
    assert_eq!(closed["outcome"], "error");
    assert_eq!(closed["principal"], "ledger");
    assert_eq!(closed["event_count"], 1);
    // Once the principals can be read again, the caller subscribes again.
    let (status, _) = Subscriber::try_open(&app, "/events/subscribe", &service, &[]).await;
    assert_eq!(status, StatusCode::OK);
}

async fn subscriptions_beyond_the_limit_are_refused(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.max_subscriptions = 1);
    let app = TestApp::start(env).await;
    let first = Subscriber::open(&app, "/events/subscribe", &app.token(), &[]).await;
    let (status, text) = app.get("/events/subscribe", &app.token()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("too many open subscriptions"), "{text}");
    let refused = app
        .audit_records("action=log.subscribe&outcome=error")
        .await;
    assert_eq!(refused.len(), 1);
    // The slot comes back when the first one ends.
    drop(first);
    eventually_recorded(&app, "action=log.subscribe.close", |_| true).await;
    let (status, _) = Subscriber::try_open(&app, "/events/subscribe", &app.token(), &[]).await;
    assert_eq!(status, StatusCode::OK);
}

async fn a_forget_recorded_by_another_process_reaches_live_subscribers(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let mut sub = Subscriber::open(&app, "/events/subscribe", &app.token(), &[]).await;
    app.append_ok("accounts-1", &deposits("cust-1", 1)).await;
    let (id, e) = sub.next().await;
    assert_eq!(e["personal_data"], "decrypted");
    // Another process records the forget's first step (the ledger entry)
    // and nothing else yet: the keys still exist everywhere.
    let store = eventvault::store::EventStore::new(crate::at_rest::events_db(&app.env).await);
    let mut cleared = app.progress().tail_clears;
    cleared.borrow_and_update();
    store.record_forget("cust-1", None).await.unwrap();
    // The notice reaches this process: its subscribers no longer get the
    // rows it held in memory, but what the ledger says.
    tokio::time::timeout(PATIENCE, cleared.changed())
        .await
        .expect("the forget notice reached this process")
        .expect("the application runs");
    let last = (id - 1).to_string();
    let mut again = Subscriber::open(
        &app,
        "/events/subscribe",
        &app.token(),
        &[("Last-Event-ID", &last)],
    )
    .await;
    let (_, e) = again.next().await;
    assert_eq!(e["personal_data"], "erased", "{e}");
    assert_no_personal_value(e.to_string());
}

/// A subscriber that reads slowly has events read, decrypted and audited
/// that have not left yet when the subject is forgotten: they are read
/// again, so that what leaves after the forget is `erased`, not decided
/// before it. (One page of a stream subscription is a hundred events; at
/// 350 KB each most of them cannot have left into the sockets' buffers
/// while the client reads none.)
async fn events_read_before_a_forget_but_not_yet_sent_are_read_again(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let note = "n".repeat(350_000);
    for _ in 0..10 {
        let events = (0..10)
            .map(|i| {
                let mut e = deposit(Uuid::new_v4(), "cust-slow", &format!("{i}.00"));
                e["data"]["note"] = json!(note);
                e
            })
            .collect();
        app.append_ok("accounts-slow", &batch(events)).await;
    }
    let mut sub =
        Subscriber::open(&app, "/streams/accounts-slow/subscribe", &app.token(), &[]).await;
    let (_, first) = sub.next().await;
    assert_eq!(first["personal_data"], "decrypted");
    let dpo = app.env.add_principal("dpo", &["dpo"]).await;
    crate::forget::forget_ok(&app, &dpo, "cust-slow").await;
    let rest = sub.take(99).await;
    let versions: Vec<u64> = rest.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        versions,
        (2..=100).collect::<Vec<u64>>(),
        "no gap, no repeat"
    );
    let erased = rest
        .iter()
        .skip_while(|(_, e)| e["personal_data"] == "decrypted")
        .collect::<Vec<_>>();
    assert!(
        !erased.is_empty(),
        "events decided before the forget left after it"
    );
    assert!(
        erased.iter().all(|(_, e)| e["personal_data"] == "erased"),
        "nothing decrypted after the first erased one"
    );
}
