//! The recommendation service end to end: the real MovieLens-trained models from the model
//! repository, real gRPC over loopback, a real feedback log on disk.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;

use marquee_e2e::*;
use marquee_proto::recommendation as pb;
use marquee_proto::recommendation::recommend_request::Subject as PbSubject;
use marquee_recommendation::model::{ModelData, read_histories};
use tonic::Code;
use tonic_types::StatusExt;

/// The model directory as the service reads it.
fn model() -> &'static ModelData {
    static M: OnceLock<ModelData> = OnceLock::new();
    M.get_or_init(|| ModelData::load(&model_repo().join("recommender")).expect("recommender built"))
}

/// One recommender per test binary (tests use distinct user ids, so they do not interfere).
fn shared_rec() -> &'static TestRecommender {
    static S: OnceLock<TestRecommender> = OnceLock::new();
    S.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let server = start_recommendation(recommendation_settings(dir.path())).await;
                let done = server.shutdown.clone();
                tx.send(server).unwrap();
                done.cancelled().await;
                drop(dir);
            });
        });
        rx.recv().expect("shared recommender starts")
    })
}

fn for_user(user_id: i64, k: u32) -> pb::RecommendRequest {
    pb::RecommendRequest {
        subject: Some(PbSubject::UserId(user_id)),
        k,
        ..Default::default()
    }
}

/// Relevance only: no diversity, no long-tail floor (the build's evaluation protocol).
fn plain(user_id: i64, k: u32) -> pb::RecommendRequest {
    pb::RecommendRequest {
        diversity: Some(0.0),
        long_tail_floor: Some(0.0),
        ..for_user(user_id, k)
    }
}

fn ids(r: &pb::RecommendResponse) -> Vec<i64> {
    r.items.iter().map(|i| i.item_id).collect()
}

/// Item ids of a user's training history.
fn history_ids(user_id: i64) -> Vec<i64> {
    let m = model();
    let idx = m.users[&user_id];
    m.histories[&idx]
        .iter()
        .map(|&(i, _)| m.catalog.items[i as usize].item_id)
        .collect()
}

/// The first `n` training users by id.
fn some_users(n: usize) -> Vec<i64> {
    let mut u: Vec<i64> = model().users.keys().copied().collect();
    u.sort_unstable();
    u.truncate(n);
    u
}

#[tokio::test]
async fn held_out_items_come_back_at_the_rate_the_build_reported() {
    let m = model();
    let metrics: serde_json::Value = serde_json::from_slice(
        &std::fs::read(model_repo().join("recommender/metrics.json")).unwrap(),
    )
    .unwrap();
    let reported = metrics["retrieval_ranking"]["recall_at_10"]
        .as_f64()
        .unwrap();
    let holdout = read_histories(&m.file("holdout.json")).unwrap();
    let by_index: HashMap<u32, i64> = m.users.iter().map(|(&id, &ix)| (ix, id)).collect();
    let mut users: Vec<(i64, HashSet<i64>)> = holdout
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(ix, h)| {
            let items = h
                .iter()
                .map(|&(i, _)| m.catalog.items[i as usize].item_id)
                .collect();
            (by_index[ix], items)
        })
        .collect();
    users.sort_by_key(|u| u.0);
    let mut client = shared_rec().client().await;
    let mut recall_sum = 0.0;
    for chunk in users.chunks(64) {
        let resp = client
            .recommend_batch(pb::RecommendBatchRequest {
                requests: chunk.iter().map(|(u, _)| plain(*u, 10)).collect(),
            })
            .await
            .unwrap()
            .into_inner();
        for ((_, held), item) in chunk.iter().zip(resp.items) {
            let Some(pb::recommend_batch_item::Result::Response(r)) = item.result else {
                panic!("batch item failed: {item:?}");
            };
            let hits = r.items.iter().filter(|i| held.contains(&i.item_id)).count();
            recall_sum += hits as f64 / held.len() as f64;
        }
    }
    let served = recall_sum / users.len() as f64;
    eprintln!("held-out recall@10: served {served:.4}, build {reported:.4}");
    // Same protocol as the build (top 500 with training history excluded, ranked, top 10,
    // relevance only); the one difference is the index instead of exact retrieval, which
    // misses at most a few of the 500 candidates. 0.01 absolute is ~7% of the build's figure and
    // about a third of its standard error over 943 users (~0.03), so a real regression in
    // retrieval, ranking or history handling fails here while ANN noise does not.
    assert!(
        (served - reported).abs() <= 0.01,
        "served recall@10 {served:.4} vs build's {reported:.4} over {} users",
        users.len()
    );
    let popularity = metrics["popularity"]["recall_at_10"].as_f64().unwrap();
    assert!(
        served > 1.2 * popularity,
        "{served} vs popularity {popularity}"
    );
}

#[tokio::test]
async fn seen_items_never_come_back() {
    let mut client = shared_rec().client().await;
    for user in some_users(20) {
        let seen: HashSet<i64> = history_ids(user).into_iter().collect();
        let r = client
            .recommend(for_user(user, 100))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.items.len(), 100);
        assert!(!r.cold_start);
        for it in &r.items {
            assert!(
                !seen.contains(&it.item_id),
                "user {user} got seen item {}",
                it.item_id
            );
        }
    }
    // An item fed back is seen too, at once.
    let user = some_users(30)[29];
    let first = client.recommend(plain(user, 5)).await.unwrap().into_inner();
    let top = first.items[0].item_id;
    client
        .record_feedback(pb::RecordFeedbackRequest {
            user_id: user,
            item_id: top,
            event: pb::FeedbackEvent::Dislike as i32,
            timestamp_ms: 0,
        })
        .await
        .unwrap();
    let again = client
        .recommend(plain(user, 100))
        .await
        .unwrap()
        .into_inner();
    assert!(!ids(&again).contains(&top), "disliked item {top} came back");
}

#[tokio::test]
async fn explain_names_real_titles_from_the_users_history() {
    let m = model();
    let user = some_users(5)[4];
    let titles: HashSet<String> = history_ids(user)
        .iter()
        .map(|id| {
            m.catalog.items[m.catalog.index_of(*id).unwrap() as usize]
                .title
                .clone()
        })
        .collect();
    let features: HashSet<String> = m
        .spec
        .user_feature_names
        .iter()
        .chain(&m.spec.item_feature_names)
        .cloned()
        .chain(m.spec.genres.iter().map(|g| format!("genre_profile:{g}")))
        .chain(["user_embedding".to_string(), "item_embedding".to_string()])
        .collect();
    let mut client = shared_rec().client().await;
    let r = client
        .recommend(pb::RecommendRequest {
            explain: true,
            ..for_user(user, 10)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.items.len(), 10);
    for it in &r.items {
        let e = it.explanation.as_ref().expect("explanation");
        assert_eq!(e.because_of.len(), 3);
        for h in &e.because_of {
            assert!(
                titles.contains(&h.title),
                "`{}` is not in the history",
                h.title
            );
            assert!(!h.title.is_empty() && h.similarity.is_finite());
        }
        assert!(
            e.because_of
                .windows(2)
                .all(|w| w[0].similarity >= w[1].similarity)
        );
        assert_eq!(e.features.len(), 5);
        for f in &e.features {
            assert!(features.contains(&f.name), "unknown feature `{}`", f.name);
        }
        assert!(e.features.iter().any(|f| f.contribution != 0.0));
    }
    let plain_r = client
        .recommend(for_user(user, 10))
        .await
        .unwrap()
        .into_inner();
    assert!(plain_r.items.iter().all(|i| i.explanation.is_none()));
}

/// How many of the items carry `genre`.
fn genre_count(r: &pb::RecommendResponse, genre: &str) -> usize {
    r.items
        .iter()
        .filter(|i| i.genres.iter().any(|g| g == genre))
        .count()
}

#[tokio::test]
async fn feedback_shifts_the_next_list_toward_the_genre_fed_back() {
    let m = model();
    let mut client = shared_rec().client().await;
    // A new user: starts cold, then watches horror films.
    let user = 5_000_001;
    let before = client
        .recommend(plain(user, 100))
        .await
        .unwrap()
        .into_inner();
    assert!(before.cold_start);
    let horror = m.catalog.genre_bit("Horror").unwrap();
    let mut horror_items: Vec<&marquee_recommendation::model::Item> = m.catalog.items[1..]
        .iter()
        .filter(|i| i.genres & horror != 0)
        .collect();
    horror_items.sort_by_key(|i| std::cmp::Reverse(i.popularity));
    // Well-known but not the very top titles: with the eight most popular horror films the
    // 22:00 dev build's user tower barely moves (a model matter, reported to its owner).
    for (n, item) in horror_items.iter().skip(20).take(8).enumerate() {
        let ack = client
            .record_feedback(pb::RecordFeedbackRequest {
                user_id: user,
                item_id: item.item_id,
                event: pb::FeedbackEvent::Watch as i32,
                timestamp_ms: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ack.history_length as usize, n + 1);
    }
    let after = client
        .recommend(plain(user, 100))
        .await
        .unwrap()
        .into_inner();
    assert!(!after.cold_start);
    let (b, a) = (
        genre_count(&before, "Horror"),
        genre_count(&after, "Horror"),
    );
    eprintln!("horror items in the top 100: {b} before, {a} after");
    // How far the list moves is the model's; the service must feed the new history to the
    // towers and the ranker at once, which moves several horror films into the list.
    assert!(
        a >= b + 3,
        "horror items in the top 100: {b} before, {a} after"
    );
    let watched = shared_rec().metric(
        "marquee_recommendation_feedback_events_total",
        &[("event", "watch")],
    );
    assert!(watched >= 8.0, "{watched}");
}

#[tokio::test]
async fn forget_user_makes_them_indistinguishable_from_cold_start_also_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let user = some_users(12)[11];
    let stranger = 7_000_001; // never seen
    let cold_view = |r: &pb::RecommendResponse| {
        r.items
            .iter()
            .map(|i| (i.item_id, i.score.to_bits(), i.retrieval_score.to_bits()))
            .collect::<Vec<_>>()
    };
    let server = start_recommendation(recommendation_settings(dir.path())).await;
    let mut client = server.client().await;
    client
        .record_feedback(pb::RecordFeedbackRequest {
            user_id: user,
            item_id: 1,
            event: pb::FeedbackEvent::Like as i32,
            timestamp_ms: 0,
        })
        .await
        .unwrap();
    let known = client
        .recommend(for_user(user, 20))
        .await
        .unwrap()
        .into_inner();
    let cold = client
        .recommend(for_user(stranger, 20))
        .await
        .unwrap()
        .into_inner();
    assert!(!known.cold_start && cold.cold_start);
    assert_ne!(cold_view(&known), cold_view(&cold));
    let forgot = client
        .forget_user(pb::ForgetUserRequest { user_id: user })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(forgot.log_records_removed, 1);
    assert_eq!(forgot.history_removed as usize, history_ids(user).len() + 1);
    let after = client
        .recommend(for_user(user, 20))
        .await
        .unwrap()
        .into_inner();
    assert!(after.cold_start);
    assert_eq!(
        cold_view(&after),
        cold_view(&cold),
        "forgotten = cold start"
    );
    // The log holds no record of the user but the tombstone.
    let key =
        marquee_recommendation::privacy::UserKey::load_or_create(&dir.path().join("user_id.key"))
            .unwrap();
    let replay =
        marquee_recommendation::feedback::read_all(&dir.path().join("feedback.log")).unwrap();
    assert!(matches!(
        replay.records.as_slice(),
        [marquee_recommendation::feedback::Record::Forget { user: u }] if *u == key.hash(user)
    ));
    server.shutdown.cancel();

    // A restart replays the tombstone: the training history stays gone.
    let again = start_recommendation(recommendation_settings(dir.path())).await;
    let mut client = again.client().await;
    let r = client
        .recommend(for_user(user, 20))
        .await
        .unwrap()
        .into_inner();
    assert!(r.cold_start);
    assert_eq!(cold_view(&r), cold_view(&cold));
    again.shutdown.cancel();
}

/// Records one like of `user` for item `item` at `timestamp_ms`; the user's history length.
async fn like_at(
    c: &mut marquee_proto::recommendation::recommender_client::RecommenderClient<
        tonic::transport::Channel,
    >,
    user: i64,
    item: i64,
    timestamp_ms: i64,
) -> u32 {
    c.record_feedback(pb::RecordFeedbackRequest {
        user_id: user,
        item_id: item,
        event: pb::FeedbackEvent::Like as i32,
        timestamp_ms,
    })
    .await
    .expect("feedback recorded")
    .into_inner()
    .history_length
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_older_than_the_retention_period_is_purged_at_start_and_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let user = 7_000_101; // not a training user: its history is only feedback
    let day_ms = 86_400_000;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    // The clock this test controls: each event's own timestamp.
    let old = now() - 40 * day_ms;
    // Without retention: 3 events 40 days old and 2 of today are all kept.
    let server = start_recommendation(recommendation_settings(dir.path())).await;
    let mut c = server.client().await;
    for (i, ts) in [old, old + 1, old + 2, 0, 0].into_iter().enumerate() {
        assert_eq!(like_at(&mut c, user, 1 + i as i64, ts).await, i as u32 + 1);
    }
    server.shutdown.cancel();

    // With a 30-day retention: the old events are gone at start, before anything is served.
    let mut s = recommendation_settings(dir.path());
    s.recommendation.retention_days = 30;
    s.recommendation.retention_purge_interval_ms = 100;
    let server = start_recommendation(s).await;
    let purged = |server: &TestRecommender| {
        server.metric("marquee_recommendation_feedback_purged_total", &[])
    };
    assert_eq!(purged(&server), 3.0);
    let mut c = server.client().await;
    assert_eq!(like_at(&mut c, user, 6, 0).await, 3, "2 recent + this one");

    // While serving: an event that is already expired is accepted, then purged by the next
    // pass, from the log and from the user's history.
    assert_eq!(like_at(&mut c, user, 7, now() - 31 * day_ms).await, 4);
    wait_until(
        "the periodic retention pass",
        std::time::Duration::from_secs(60),
        || {
            let n = purged(&server);
            async move { (n >= 4.0).then_some(()) }
        },
    )
    .await;
    assert_eq!(like_at(&mut c, user, 8, 0).await, 4, "3 recent + this one");
    let cutoff = now() - 30 * day_ms;
    let replay =
        marquee_recommendation::feedback::read_all(&dir.path().join("feedback.log")).unwrap();
    assert_eq!(replay.records.len(), 4);
    assert!(replay.records.iter().all(|r| matches!(
        r,
        marquee_recommendation::feedback::Record::Feedback { timestamp_ms, .. } if *timestamp_ms >= cutoff
    )));
    server.shutdown.cancel();
}

/// Mean number of distinct genres per list.
fn distinct_genres(lists: &[pb::RecommendResponse]) -> f64 {
    let total: usize = lists
        .iter()
        .map(|r| {
            r.items
                .iter()
                .flat_map(|i| i.genres.iter())
                .collect::<HashSet<_>>()
                .len()
        })
        .sum();
    total as f64 / lists.len() as f64
}

#[tokio::test]
async fn diversity_one_gives_more_genre_diversity_than_zero() {
    let mut client = shared_rec().client().await;
    let users = some_users(60)[40..].to_vec();
    let mut lists = HashMap::new();
    for lambda in [0.0f32, 1.0] {
        let mut out = Vec::new();
        for &u in &users {
            let req = pb::RecommendRequest {
                diversity: Some(lambda),
                long_tail_floor: Some(0.0),
                ..for_user(u, 10)
            };
            out.push(client.recommend(req).await.unwrap().into_inner());
        }
        lists.insert(lambda.to_bits(), out);
    }
    let d0 = distinct_genres(&lists[&0.0f32.to_bits()]);
    let d1 = distinct_genres(&lists[&1.0f32.to_bits()]);
    eprintln!("distinct genres per 10-item list: λ=0 {d0:.2}, λ=1 {d1:.2}");
    // "Measurably": at least one more distinct genre per 10-item list on average.
    assert!(
        d1 >= d0 + 1.0,
        "distinct genres per list: λ=0 {d0:.2}, λ=1 {d1:.2}"
    );
}

#[tokio::test]
async fn long_tail_floor_holds_and_exposure_metrics_are_exported() {
    let server = shared_rec();
    let mut client = server.client().await;
    for u in some_users(80)[60..].iter() {
        let r = client
            .recommend(pb::RecommendRequest {
                long_tail_floor: Some(0.5),
                ..for_user(*u, 10)
            })
            .await
            .unwrap()
            .into_inner();
        let tail = r.items.iter().filter(|i| i.long_tail).count();
        assert!(tail >= 5, "user {u}: {tail} long-tail items of 10");
    }
    let (status, body) = http_get(server.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "marquee_recommendation_catalog_coverage_ratio",
        "marquee_recommendation_exposure_gini",
        "marquee_recommendation_long_tail_share_ratio",
        "marquee_recommendation_stage_seconds_bucket",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    let coverage = server.metric("marquee_recommendation_catalog_coverage_ratio", &[]);
    let share = server.metric("marquee_recommendation_long_tail_share_ratio", &[]);
    let gini = server.metric("marquee_recommendation_exposure_gini", &[]);
    assert!(coverage > 0.0 && coverage <= 1.0, "{coverage}");
    assert!(share > 0.0 && share <= 1.0, "{share}");
    assert!(gini > 0.0 && gini < 1.0, "{gini}");
    // No user id in any label.
    assert!(!body.contains("user_id") && !body.contains("user="));
}

/// Recall@100 of `index` for the real users' embeddings against exact f32 search, with no
/// filter and with filters keeping about 10% and 1% of items (independent of the embedding).
fn user_recall(
    index: &marquee_recommendation::index::ItemIndex,
    emb: &marquee_recommendation::model::Matrix,
    users: usize,
) -> [f64; 3] {
    use marquee_recommendation::index::{exact_search, recall};
    let m = model();
    let subjects: Vec<marquee_recommendation::users::Subject> = some_users(users)
        .iter()
        .map(|u| {
            let idx = m.users[u];
            let history: Vec<u32> = m.histories[&idx].iter().map(|h| h.0).collect();
            marquee_recommendation::users::Subject {
                user_index: idx,
                exclude: history.clone(),
                history,
            }
        })
        .collect();
    let queries = marquee_recommendation::engine::user_embeddings(m, &subjects).unwrap();
    let share = |cut: u64| move |i: u32| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54 < cut;
    let (ten, one) = (share(102), share(10));
    let mut total = [0.0; 3];
    for q in 0..queries.rows {
        let query = queries.row(q);
        total[0] += recall(
            &index.search(emb, query, 100, None),
            &exact_search(emb, query, 100, |_| true),
        );
        let got = index.search(emb, query, 100, Some(&ten));
        assert!(got.iter().all(|s| ten(s.0)), "the filter holds");
        total[1] += recall(&got, &exact_search(emb, query, 100, ten));
        let got = index.search(emb, query, 100, Some(&one));
        total[2] += recall(&got, &exact_search(emb, query, 100, one));
    }
    total.map(|t| t / queries.rows as f64)
}

#[tokio::test]
async fn retrieval_recall_at_100_is_at_least_095_against_exact_search() {
    let engine = shared_rec()
        .repo
        .only()
        .expect("a version serves")
        .engine
        .clone();
    let shared = &engine.shared;
    let [all, ten, one] = user_recall(&shared.index, &shared.item_emb, 200);
    eprintln!("real catalogue recall@100: {all:.4}, 10% filter {ten:.4}, 1% filter {one:.4}");
    for (what, r) in [("no filter", all), ("10% filter", ten), ("1% filter", one)] {
        assert!(r >= 0.95, "recall@100 with {what}: {r:.4} over 200 users");
    }
}

/// The catalogue-scale path end to end: a 100k-item synthetic catalogue (the bench's, grown
/// from the real one) served with the partitioned index at the default scan share,
/// `SimilarItems` over gRPC against exact f32 search, without a filter and
/// with genre filters of about 10% and 1% of the catalogue; and the served index's recall for
/// the real users' embeddings.
#[tokio::test]
async fn retrieval_recall_holds_at_100k_items_over_grpc() {
    use marquee_recommendation::index::{exact_search, recall};
    let m = model();
    let emb = marquee_recommendation::engine::item_embeddings(m).unwrap();
    let (big, big_emb) = marquee_recommendation::synthetic::expand(m, &emb, 100_000, 0.02, 0x5eed);
    let dir = tempfile::tempdir().unwrap();
    let mut settings = recommendation_settings(dir.path());
    settings.repository.lanes = Some(1);
    // A tenth of the catalogue (~32 of 316 partitions) rather than the default floor's third,
    // so this measures partition choice. (At 5%, 16 partitions, item queries measured 0.92:
    // what a query needs is a number of partitions more than a share; the default floor of
    // 32,768 items keeps small catalogues far above it.)
    settings.recommendation.ivf_min_scan = 10_000;
    let server = start_recommendation_with_parts(
        settings,
        vec![marquee_recommendation::family::Preloaded {
            data: big.clone(),
            item_emb: big_emb.clone(),
            index: None,
        }],
    )
    .await;
    let engine = server.repo.only().expect("a version serves").engine.clone();
    let index = &engine.shared.index;
    assert!(index.is_approximate() && index.lists() > 100, "partitioned");

    // Genres whose items are nearest 10% and 1% of the catalogue.
    let n = big.catalog.len();
    let share_of = |bit: u64| {
        big.catalog.items[1..]
            .iter()
            .filter(|i| i.genres & bit != 0)
            .count() as f64
            / n as f64
    };
    let nearest = |target: f64| {
        (0..big.catalog.genre_names.len())
            .min_by(|&a, &b| {
                let d = |g: usize| (share_of(1 << g) / target).ln().abs();
                d(a).total_cmp(&d(b))
            })
            .unwrap()
    };
    let mut client = server.client().await;
    for target in [1.0, 0.10, 0.01] {
        let genre = (target < 1.0).then(|| nearest(target));
        let mask = genre.map_or(0, |g| 1u64 << g);
        let mut total = 0.0;
        let queries = 20;
        for q in 0..queries {
            // Real and synthetic query items alike.
            let item = 1 + (q * 4_999) % n;
            let resp = client
                .similar_items(pb::SimilarItemsRequest {
                    item_id: big.catalog.items[item].item_id,
                    k: 100,
                    filter: genre.map(|g| pb::Filter {
                        require_genres: vec![big.catalog.genre_names[g].clone()],
                        ..Default::default()
                    }),
                })
                .await
                .unwrap()
                .into_inner();
            let got: Vec<(u32, f32)> = resp
                .items
                .iter()
                .map(|i| (big.catalog.index_of(i.item_id).unwrap(), i.score))
                .collect();
            let exact = exact_search(&big_emb, big_emb.row(item), 100, |i| {
                i as usize != item
                    && (mask == 0 || big.catalog.items[i as usize].genres & mask != 0)
            });
            assert!(
                got.iter().all(|&(i, _)| i as usize != item
                    && (mask == 0 || big.catalog.items[i as usize].genres & mask != 0)),
                "the filter holds"
            );
            total += recall(&got, &exact);
        }
        let r = total / queries as f64;
        let kept = if mask == 0 { 1.0 } else { share_of(mask) };
        eprintln!("100k items, filter keeping {kept:.3}: SimilarItems recall@100 {r:.4}");
        assert!(
            r >= 0.95,
            "recall@100 {r:.4} with a filter keeping {kept:.3}"
        );
    }
    let [all, ten, one] = user_recall(index, &engine.shared.item_emb, 100);
    eprintln!("100k items, users: recall@100 {all:.4}, 10% filter {ten:.4}, 1% filter {one:.4}");
    for (what, r) in [("no filter", all), ("10% filter", ten), ("1% filter", one)] {
        assert!(r >= 0.95, "recall@100 with {what}: {r:.4} over 100 users");
    }
    server.shutdown.cancel();
}

#[tokio::test]
async fn cold_start_and_anonymous_context_never_fail() {
    let m = model();
    let mut client = shared_rec().client().await;
    let cold = client
        .recommend(for_user(9_000_001, 10))
        .await
        .unwrap()
        .into_inner();
    assert!(cold.cold_start);
    assert_eq!(cold.items.len(), 10);
    let none = client
        .recommend(pb::RecommendRequest {
            k: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&none), ids(&cold), "no subject = cold start");
    // Context: five science-fiction films; the list follows them and skips them.
    let scifi = m.catalog.genre_bit("Sci-Fi").unwrap();
    let mut pool: Vec<&marquee_recommendation::model::Item> = m.catalog.items[1..]
        .iter()
        .filter(|i| i.genres & scifi != 0)
        .collect();
    pool.sort_by_key(|i| std::cmp::Reverse(i.popularity));
    let recent: Vec<i64> = pool.iter().take(5).map(|i| i.item_id).collect();
    let ctx = client
        .recommend(pb::RecommendRequest {
            subject: Some(PbSubject::Anonymous(pb::AnonymousContext {
                recent_item_ids: recent.clone(),
            })),
            k: 50,
            diversity: Some(0.0),
            long_tail_floor: Some(0.0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ctx.cold_start);
    assert!(ids(&ctx).iter().all(|i| !recent.contains(i)));
    let cold50 = client
        .recommend(plain(9_000_001, 50))
        .await
        .unwrap()
        .into_inner();
    let (c, x) = (genre_count(&cold50, "Sci-Fi"), genre_count(&ctx, "Sci-Fi"));
    eprintln!("sci-fi in the top 50: cold {c}, with context {x}");
    assert!(x > c, "sci-fi in the top 50: cold {c}, with context {x}");
}

#[tokio::test]
async fn similar_items_and_filters() {
    let m = model();
    let mut client = shared_rec().client().await;
    let query = m.catalog.items[1].item_id;
    let r = client
        .similar_items(pb::SimilarItemsRequest {
            item_id: query,
            k: 10,
            filter: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.items.len(), 10);
    assert!(r.items.iter().all(|i| i.item_id != query));
    assert!(r.items.windows(2).all(|w| w[0].score >= w[1].score));
    // Filters: comedies from the 1990s, no dramas, never item 50.
    let filter = pb::Filter {
        exclude_item_ids: vec![m.catalog.items[50].item_id],
        exclude_genres: vec!["Drama".into()],
        require_genres: vec!["Comedy".into()],
        min_year: Some(1990),
        max_year: Some(1999),
    };
    let f = client
        .recommend(pb::RecommendRequest {
            filter: Some(filter),
            ..for_user(some_users(3)[2], 30)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.items.len(), 30);
    for it in &f.items {
        assert!(it.genres.iter().any(|g| g == "Comedy"), "{it:?}");
        assert!(!it.genres.iter().any(|g| g == "Drama"), "{it:?}");
        assert!((1990..=1999).contains(&it.year), "{it:?}");
        assert_ne!(it.item_id, m.catalog.items[50].item_id);
    }
}

/// Asserts a status: code, the field in its details, and fragments of the message.
fn assert_bad(status: tonic::Status, code: Code, field: &str, fragments: &[&str]) {
    assert_eq!(status.code(), code, "{status:?}");
    if code == Code::InvalidArgument {
        let br = status
            .get_details_bad_request()
            .expect("BadRequest details");
        assert_eq!(br.field_violations[0].field, field, "{status:?}");
    }
    for f in fragments {
        assert!(
            status.message().contains(f),
            "`{}` lacks `{f}`",
            status.message()
        );
    }
}

#[tokio::test]
async fn bad_input_is_refused_naming_field_limit_and_value() {
    let mut c = shared_rec().client().await;
    let user = some_users(1)[0];
    // k
    let e = c.recommend(for_user(user, 0)).await.unwrap_err();
    assert_bad(e, Code::InvalidArgument, "k", &["`k`", "1..=100", "got 0"]);
    let e = c.recommend(for_user(user, 101)).await.unwrap_err();
    assert_bad(e, Code::InvalidArgument, "k", &["1..=100", "got 101"]);
    // λ
    for bad in [1.5f32, -0.1] {
        let e = c
            .recommend(pb::RecommendRequest {
                diversity: Some(bad),
                ..for_user(user, 5)
            })
            .await
            .unwrap_err();
        assert_bad(
            e,
            Code::InvalidArgument,
            "diversity",
            &["[0, 1]", &format!("got {bad}")],
        );
    }
    let e = c
        .recommend(pb::RecommendRequest {
            long_tail_floor: Some(2.0),
            ..for_user(user, 5)
        })
        .await
        .unwrap_err();
    assert_bad(e, Code::InvalidArgument, "long_tail_floor", &["got 2"]);
    // Malformed filters.
    let with_filter = |f: pb::Filter| pb::RecommendRequest {
        filter: Some(f),
        ..for_user(user, 5)
    };
    let e = c
        .recommend(with_filter(pb::Filter {
            exclude_genres: vec!["Action".into(), "Cartoons".into()],
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_bad(
        e,
        Code::InvalidArgument,
        "filter.exclude_genres[1]",
        &["got `Cartoons`", "Action"],
    );
    let e = c
        .recommend(with_filter(pb::Filter {
            min_year: Some(2000),
            max_year: Some(1990),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_bad(
        e,
        Code::InvalidArgument,
        "filter.min_year",
        &["2000", "1990"],
    );
    // Unknown items: NOT_FOUND listing every one.
    let e = c
        .recommend(pb::RecommendRequest {
            subject: Some(PbSubject::Anonymous(pb::AnonymousContext {
                recent_item_ids: vec![1, 99_999_999, 2, -5],
            })),
            k: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad(e, Code::NotFound, "", &["99999999", "-5", "2 item id(s)"]);
    let e = c
        .recommend(with_filter(pb::Filter {
            exclude_item_ids: vec![123_456_789],
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_bad(
        e,
        Code::NotFound,
        "",
        &["filter.exclude_item_ids", "123456789"],
    );
    let e = c
        .similar_items(pb::SimilarItemsRequest {
            item_id: 424_242,
            k: 5,
            filter: None,
        })
        .await
        .unwrap_err();
    assert_bad(e, Code::NotFound, "", &["424242"]);
    let e = c
        .similar_items(pb::SimilarItemsRequest {
            item_id: 1,
            k: 0,
            filter: None,
        })
        .await
        .unwrap_err();
    assert_bad(e, Code::InvalidArgument, "k", &["got 0"]);
    // Feedback: unknown event, future timestamp, negative timestamp, unknown item.
    let fb = |event: i32, ts: i64, item: i64| pb::RecordFeedbackRequest {
        user_id: 6_000_001,
        item_id: item,
        event,
        timestamp_ms: ts,
    };
    for ev in [0, 99] {
        let e = c.record_feedback(fb(ev, 0, 1)).await.unwrap_err();
        assert_bad(
            e,
            Code::InvalidArgument,
            "event",
            &["FEEDBACK_EVENT_CLICK", &format!("got {ev}")],
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let future = now + 3_600_000;
    let e = c.record_feedback(fb(2, future, 1)).await.unwrap_err();
    assert_bad(
        e,
        Code::InvalidArgument,
        "timestamp_ms",
        &["now + 300000 ms", &format!("got {future}")],
    );
    let e = c.record_feedback(fb(2, -1, 1)).await.unwrap_err();
    assert_bad(e, Code::InvalidArgument, "timestamp_ms", &["got -1"]);
    let e = c.record_feedback(fb(2, 0, 77_777_777)).await.unwrap_err();
    assert_bad(e, Code::NotFound, "", &["77777777"]);
    // A timestamp within the allowed skew is fine.
    c.record_feedback(fb(2, now + 1_000, 1)).await.unwrap();
    // Batch: per-item errors with prefixed fields; too many requests fails the call.
    let r = c
        .recommend_batch(pb::RecommendBatchRequest {
            requests: vec![for_user(user, 3), for_user(user, 0)],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        r.items[0].result,
        Some(pb::recommend_batch_item::Result::Response(_))
    ));
    let Some(pb::recommend_batch_item::Result::Error(err)) = &r.items[1].result else {
        panic!("{:?}", r.items[1]);
    };
    assert_eq!(err.code, Code::InvalidArgument as i32);
    assert_eq!(err.field, "requests[1].k");
    let e = c
        .recommend_batch(pb::RecommendBatchRequest {
            requests: vec![for_user(user, 1); 65],
        })
        .await
        .unwrap_err();
    assert_bad(
        e,
        Code::InvalidArgument,
        "requests",
        &["at most 64", "got 65"],
    );
}

/// Feedback is being written concurrently when the real binary is SIGKILLed; a torn record is
/// then appended, as a power cut mid-write would leave. After a restart every acknowledged
/// event is present, the torn tail is gone, and the log is clean.
#[test]
fn sigkill_during_feedback_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let env = |d: &Path| {
        vec![
            (
                "MARQUEE__REPOSITORY__PATH",
                model_repo().display().to_string(),
            ),
            ("MARQUEE__REPOSITORY__THREADS", "1".to_string()),
            (
                "MARQUEE__RECOMMENDATION__STATE_DIR",
                d.display().to_string(),
            ),
        ]
    };
    let mut child = ChildServer::start("marquee-recommendation", &env(dir.path()));
    let url = format!("http://{}", child.grpc_addr);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let items: Vec<i64> = model().catalog.items[1..200]
        .iter()
        .map(|i| i.item_id)
        .collect();
    let acked: Vec<(i64, i64)> = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for w in 0..4i64 {
            let (url, tx, items) = (url.clone(), tx.clone(), items.clone());
            tokio::spawn(async move {
                let ch = tonic::transport::Channel::from_shared(url)
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let mut c =
                    marquee_proto::recommendation::recommender_client::RecommenderClient::new(ch);
                for n in 0.. {
                    let user = 8_000_000 + w;
                    let item = items[n % items.len()];
                    let r = c
                        .record_feedback(pb::RecordFeedbackRequest {
                            user_id: user,
                            item_id: item,
                            event: pb::FeedbackEvent::Watch as i32,
                            timestamp_ms: 0,
                        })
                        .await;
                    match r {
                        Ok(_) => {
                            if tx.send((user, item)).is_err() {
                                return;
                            }
                        }
                        Err(_) => return, // the server died
                    }
                }
            });
        }
        drop(tx);
        let mut acked = Vec::new();
        while let Some(a) = rx.recv().await {
            acked.push(a);
            if acked.len() == 150 {
                break; // writers are still going: kill mid-stream
            }
        }
        acked
    });
    child.kill();
    rt.shutdown_background();
    let log_path = dir.path().join("feedback.log");
    let before = marquee_recommendation::feedback::read_all(&log_path).unwrap();
    assert_eq!(before.dropped_bytes, 0, "a SIGKILL leaves whole records");
    // A torn record: a frame header promising 34 bytes and only 5 of them.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&log_path)
            .unwrap();
        f.write_all(&[34, 0, 0, 0, 1, 2, 3, 4, 1, 9, 9, 9, 9])
            .unwrap();
    }
    let child2 = ChildServer::start("marquee-recommendation", &env(dir.path()));
    let after = marquee_recommendation::feedback::read_all(&log_path).unwrap();
    assert_eq!(after.dropped_bytes, 0, "the restart cut the torn tail off");
    assert_eq!(after.records, before.records, "every whole record kept");
    let key =
        marquee_recommendation::privacy::UserKey::load_or_create(&dir.path().join("user_id.key"))
            .unwrap();
    let mut logged: HashMap<(marquee_recommendation::privacy::UserHash, i64), usize> =
        HashMap::new();
    for r in &after.records {
        if let marquee_recommendation::feedback::Record::Feedback { user, item_id, .. } = r {
            *logged.entry((*user, *item_id)).or_default() += 1;
        }
    }
    let mut wanted: HashMap<(marquee_recommendation::privacy::UserHash, i64), usize> =
        HashMap::new();
    for (u, i) in &acked {
        *wanted.entry((key.hash(*u), *i)).or_default() += 1;
    }
    for (k, n) in &wanted {
        assert!(
            logged.get(k).copied().unwrap_or(0) >= *n,
            "acknowledged event {k:?} lost"
        );
    }
    // The restarted server holds the replayed history and serves on.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{}", child2.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = marquee_proto::recommendation::recommender_client::RecommenderClient::new(ch);
        for w in 0..4i64 {
            let user = 8_000_000 + w;
            let acked_n = acked.iter().filter(|a| a.0 == user).count();
            let logged_n = after
                .records
                .iter()
                .filter(|r| r.user() == key.hash(user))
                .count();
            let ack = c
                .record_feedback(pb::RecordFeedbackRequest {
                    user_id: user,
                    item_id: items[0],
                    event: pb::FeedbackEvent::Watch as i32,
                    timestamp_ms: 0,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(ack.history_length as usize > acked_n);
            assert_eq!(ack.history_length as usize, logged_n + 1);
        }
        let (_, metrics) = http_get(child2.admin_addr, "/metrics").await;
        let dropped = metrics
            .lines()
            .find(|l| l.starts_with("marquee_recommendation_feedback_log_dropped_bytes_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert_eq!(dropped, 13.0, "the torn record was detected and counted");
    });
}

/// An engine thread serves what is queued together: one user-tower forward and one ranker
/// forward for every request in the batch, the rows of all of them side by side. Every caller
/// must still get exactly its own list: 32 users (explanations on some, a genre filter on
/// others) called at once against one engine thread, three times over, each answer equal to
/// the one the same request gets alone; and batches of several requests did happen.
#[tokio::test]
async fn batched_requests_each_get_exactly_their_own_list() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = recommendation_settings(dir.path());
    settings.repository.lanes = Some(1);
    let server = start_recommendation(settings).await;
    let client = server.client().await;
    let requests: Vec<pb::RecommendRequest> = some_users(32)
        .into_iter()
        .enumerate()
        .map(|(n, user)| pb::RecommendRequest {
            explain: n % 2 == 0,
            filter: (n % 3 == 0).then(|| pb::Filter {
                exclude_genres: vec!["Drama".into()],
                ..Default::default()
            }),
            ..for_user(user, 10)
        })
        .collect();
    let answer = |r: pb::RecommendResponse| {
        r.items
            .iter()
            .map(|i| {
                let because: Vec<i64> = i
                    .explanation
                    .as_ref()
                    .map(|e| e.because_of.iter().map(|b| b.item_id).collect())
                    .unwrap_or_default();
                (i.item_id, because)
            })
            .collect::<Vec<_>>()
    };
    let mut alone = Vec::new();
    for r in &requests {
        alone.push(answer(
            client
                .clone()
                .recommend(r.clone())
                .await
                .unwrap()
                .into_inner(),
        ));
    }
    let batches_before = batch_histogram(&server);
    for round in 0..3 {
        let together = futures::future::join_all(
            requests
                .iter()
                .map(|r| async { client.clone().recommend(r.clone()).await }),
        )
        .await;
        for (n, (got, want)) in together.into_iter().zip(&alone).enumerate() {
            assert_eq!(
                &answer(got.unwrap().into_inner()),
                want,
                "round {round}: request {n} got another list than it gets alone"
            );
        }
    }
    let (count, sum) = batch_histogram(&server);
    let (count, sum) = (count - batches_before.0, sum - batches_before.1);
    assert_eq!(
        sum as usize,
        3 * requests.len(),
        "every request was in one batch"
    );
    assert!(
        (count as f64) < sum,
        "96 concurrent requests went through {count} batches: none held more than one"
    );
    server.shutdown.cancel();
}

/// (batches, requests) of the engine-batch histogram so far.
fn batch_histogram(server: &TestRecommender) -> (u64, f64) {
    server
        .metrics
        .registry
        .gather()
        .iter()
        .filter(|f| f.name() == "marquee_recommendation_engine_batch_requests")
        .flat_map(|f| f.get_metric().iter())
        .map(|m| {
            let h = m.get_histogram();
            (h.get_sample_count(), h.get_sample_sum())
        })
        .fold((0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}
