//! Tenant isolation of user state, end to end: a real recommender behind a real gateway with
//! two API-key tenants, the gateway forwarding each caller's authenticated tenant with a shared
//! token, the recommender keying users by (tenant, user id).
//!
//! The defect this guards (reproduced before the fix): tenant a recorded likes for a new user
//! id, and tenant b's `Recommend(explain)` for the same id explained its picks with a's likes.

use marquee_e2e::*;
use marquee_proto::recommendation::recommender_client::RecommenderClient;
use marquee_proto::recommendation::{FeedbackEvent, ForgetUserRequest, RecordFeedbackRequest};
use tonic::Code;
use tonic::transport::Channel;

const A_KEY: &str = "tenant-a-key-6b1d0c";
const B_KEY: &str = "tenant-b-key-93e4f2";
const TOKEN: &str = "gateway-tenant-token-1f9c2e7a";
/// A user id neither the training data nor other tests use.
const USER: i64 = 900_001;

async fn like(via: &mut RecommenderClient<Channel>, key: &str, item_id: i64) -> u32 {
    via.record_feedback(with_key(
        RecordFeedbackRequest {
            user_id: USER,
            item_id,
            event: FeedbackEvent::Like as i32,
            timestamp_ms: 0,
        },
        key,
    ))
    .await
    .expect("feedback through the gateway")
    .into_inner()
    .history_length
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_users_are_invisible_to_another_and_the_tenant_comes_only_from_the_gateway() {
    let state = tempfile::tempdir().unwrap();
    let token_file = state.path().join("tenant.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut rs = recommendation_settings(&state.path().join("rec"));
    rs.recommendation.tenant_token_file = Some(token_file.clone());
    let rec = start_recommendation(rs).await;

    let s = tenant_gateway_settings(&[rec.grpc_addr], &token_file, &[(A_KEY, "a"), (B_KEY, "b")]);
    let gw = start_gateway(s).await;
    let mut via = RecommenderClient::new(gw.channel().await);
    let mut direct = rec.client().await;

    // Tenant a: 8 likes for a new user.
    let cold = via
        .recommend(with_key(explained(USER), A_KEY))
        .await
        .unwrap()
        .into_inner();
    assert!(cold.cold_start);
    let liked: Vec<i64> = cold.items.iter().take(8).map(|i| i.item_id).collect();
    for (n, &item) in liked.iter().enumerate() {
        assert_eq!(like(&mut via, A_KEY, item).await, n as u32 + 1);
    }
    let for_a = via
        .recommend(with_key(explained(USER), A_KEY))
        .await
        .unwrap()
        .into_inner();
    assert!(!for_a.cold_start, "a's user has a history now");
    assert!(
        history_named(&for_a).iter().any(|i| liked.contains(i)),
        "a's explanations name a's likes"
    );

    // Tenant b, same user id: a different user, who has done nothing.
    let for_b = via
        .recommend(with_key(explained(USER), B_KEY))
        .await
        .unwrap()
        .into_inner();
    assert!(for_b.cold_start, "b's user of the same id has no history");
    assert!(
        history_named(&for_b).is_empty(),
        "nothing of a's history in b's explanations: {:?}",
        history_named(&for_b)
    );
    // A tenant header the client sends itself is not what the gateway forwards.
    let mut spoof = with_key(explained(USER), B_KEY);
    spoof
        .metadata_mut()
        .insert("x-marquee-tenant", "a".parse().unwrap());
    let spoofed = via.recommend(spoof).await.unwrap().into_inner();
    assert!(
        spoofed.cold_start,
        "b claiming to be a through the gateway is still b"
    );
    // b's erasure of "its" user erases nothing of a's.
    let forgot = via
        .forget_user(with_key(ForgetUserRequest { user_id: USER }, B_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((forgot.history_removed, forgot.log_records_removed), (0, 0));
    assert_eq!(
        like(&mut via, A_KEY, liked[0]).await,
        9,
        "a's user kept all 8 events"
    );

    // Directly at the backend: no tenant header is the default tenant (another user again);
    // a tenant header without the gateway's token is refused.
    let default = direct
        .recommend(explained(USER))
        .await
        .unwrap()
        .into_inner();
    assert!(default.cold_start);
    for token in [None, Some("not-the-gateway-token-000000")] {
        let err = direct
            .recommend(with_tenant(explained(USER), "a", token))
            .await
            .expect_err("forged tenant");
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    }
    // With the token, it is tenant a (this is what the gateway sends).
    let as_a = direct
        .recommend(with_tenant(explained(USER), "a", Some(TOKEN)))
        .await
        .unwrap()
        .into_inner();
    assert!(!as_a.cold_start);
    gw.shutdown.cancel();
    rec.shutdown.cancel();
}
