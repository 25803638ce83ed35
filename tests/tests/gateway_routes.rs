//! End to end: the gateway's recommendation route in front of a real recommender, with the
//! read and write scopes enforced at the gateway.

use marquee_e2e::*;
use marquee_gateway::config::ApiKey;
use marquee_proto::recommendation::recommend_request::Subject;
use marquee_proto::recommendation::recommender_client::RecommenderClient;
use marquee_proto::recommendation::{
    FeedbackEvent, ForgetUserRequest, RecommendRequest, RecordFeedbackRequest,
};
use tonic::Code;

const READ_KEY: &str = "rec-read-key-81f3aa";
const WRITE_KEY: &str = "rec-write-key-2c9d10";

#[tokio::test]
async fn recommendations_route_through_the_gateway_with_read_and_write_scopes() {
    let state = tempfile::tempdir().unwrap();
    let rec = start_recommendation(recommendation_settings(state.path())).await;
    let mut s = gateway_settings(&[rec.grpc_addr]);
    s.backends.clear();
    s.backends.insert(
        "recommendation".into(),
        recommendation_backend(rec.grpc_addr),
    );
    let key = |k: &str, scopes: &[&str]| ApiKey {
        sha256: marquee_gateway::auth::hash_key(k),
        tenant: "globex".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    };
    s.auth
        .api_keys
        .push(key(READ_KEY, &["recommendation:read"]));
    s.auth.api_keys.push(key(
        WRITE_KEY,
        &["recommendation:read", "recommendation:write"],
    ));
    let gw = start_gateway(s).await;
    let mut via = RecommenderClient::new(gw.channel().await);
    let mut direct = rec.client().await;

    let req = RecommendRequest {
        subject: Some(Subject::UserId(42)),
        k: 10,
        diversity: Some(0.0),
        ..Default::default()
    };
    // Through the gateway the call is tenant globex's; directly, the same tenant is named in
    // the header the gateway sets (no tenant token is configured here).
    let mut as_globex = tonic::Request::new(req.clone());
    as_globex
        .metadata_mut()
        .insert("x-marquee-tenant", "globex".parse().unwrap());
    let want = direct
        .recommend(as_globex)
        .await
        .expect("direct")
        .into_inner();
    let got = via
        .recommend(with_key(req.clone(), READ_KEY))
        .await
        .expect("through the gateway")
        .into_inner();
    let ids = |r: &marquee_proto::recommendation::RecommendResponse| {
        r.items.iter().map(|i| i.item_id).collect::<Vec<_>>()
    };
    assert_eq!(ids(&got), ids(&want));
    assert_eq!(got.items.len(), 10);

    // Writes need recommendation:write; the refusal names it and nothing reaches the log.
    let feedback = RecordFeedbackRequest {
        user_id: 42,
        item_id: got.items[0].item_id,
        event: FeedbackEvent::Watch as i32,
        timestamp_ms: 0,
    };
    let err = via
        .record_feedback(with_key(feedback, READ_KEY))
        .await
        .expect_err("read-only key");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("recommendation:write"),
        "{}",
        err.message()
    );
    let err = via
        .forget_user(with_key(ForgetUserRequest { user_id: 42 }, READ_KEY))
        .await
        .expect_err("read-only key");
    assert_eq!(err.code(), Code::PermissionDenied);
    via.record_feedback(with_key(feedback, WRITE_KEY))
        .await
        .expect("write key records feedback");
    // The backend's own validation comes back unchanged through the gateway.
    let err = via
        .recommend(with_key(
            RecommendRequest {
                k: 0,
                ..req.clone()
            },
            READ_KEY,
        ))
        .await
        .expect_err("k = 0");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("k"), "{}", err.message());
    let err = via.recommend(req).await.expect_err("no credentials");
    assert_eq!(err.code(), Code::Unauthenticated);
    gw.shutdown.cancel();
    rec.shutdown.cancel();
}
