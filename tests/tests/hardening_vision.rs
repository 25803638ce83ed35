//! Issue 10, items 2 and 9, end to end: hostile images get a clear status with bounded memory,
//! and decoding is bounded, deadline-aware and skips callers that left.
//!
//! The servers run in this process, so its memory is theirs: the tests take turns (`TURN`)
//! and the memory test reads this process's peak RSS against its own baseline.

use std::time::Duration;

use futures::future::join_all;
use marquee_e2e::hostile::{HostileImage, corpus, peak_rss_bytes, reset_peak_rss, rss_bytes};
use marquee_e2e::*;
use marquee_proto::vision::classify_batch_item::Result as ItemResult;
use marquee_proto::vision::image_input::Source;
use marquee_proto::vision::*;
use tonic::Code;
use tonic_types::StatusExt;

/// One test at a time: each measures or loads the memory and CPU of the whole process.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MODEL: &str = "efficientnet_lite0";

fn encoded(bytes: Vec<u8>) -> ImageInput {
    ImageInput {
        source: Some(Source::Encoded(bytes.into())),
    }
}

fn classify(bytes: Vec<u8>) -> ClassifyRequest {
    ClassifyRequest {
        model: MODEL.into(),
        image: Some(encoded(bytes)),
        top_k: 1,
    }
}

fn batch(images: Vec<Vec<u8>>) -> ClassifyBatchRequest {
    ClassifyBatchRequest {
        model: MODEL.into(),
        images: images.into_iter().map(encoded).collect(),
        top_k: 1,
    }
}

/// A vision server serving only `efficientnet_lite0` (resize to 256, crop 224) with one lane.
fn vision_settings() -> marquee_vision::Settings {
    let mut s = settings(&model_repo());
    s.repository.models = vec![MODEL.into()];
    s.repository.lanes = Some(1);
    // Start fast; the batch size is not what these tests are about.
    s.repository.profile_batching = Some(false);
    s
}

/// Starts a server on a runtime built like the binary's (`server.worker_threads` async
/// threads, `server.blocking_threads` blocking threads), so blocking work queues as it would
/// in production.
fn start_like_the_binary(settings: marquee_vision::Settings) -> TestServer {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.server.worker_threads.max(1))
            .max_blocking_threads(settings.server.blocking_threads.max(1))
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let server = start(settings).await;
            let done = server.shutdown.clone();
            tx.send(server).unwrap();
            done.cancelled().await;
        });
    });
    rx.recv().expect("server starts")
}

async fn espresso_is_still_served(server: &TestServer) {
    let mut req = tonic::Request::new(classify(fixture("coffee.png")));
    req.set_timeout(Duration::from_secs(10));
    let out = server
        .vision()
        .await
        .classify(req)
        .await
        .expect("a normal image is served")
        .into_inner();
    assert_eq!(out.labels[0].name, "espresso");
}

fn describe(item: &HostileImage) -> String {
    format!("{} ({} bytes)", item.name, item.bytes.len())
}

// === item 2: hostile images ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_image_gets_its_status_with_bounded_memory() {
    let _turn = TURN.lock().await;
    let settings = vision_settings();
    let (workers, max_pixels) = (
        settings.vision.decode_workers as u64,
        settings.vision.max_pixels,
    );
    let server = start_like_the_binary(settings);
    let mut client = server.vision().await;
    let images = corpus();
    espresso_is_still_served(&server).await;
    // The model's own memory for a batch is part of the baseline, not of the decodes.
    let warm = batch(vec![fixture("coffee.png"); 16]);
    client
        .classify_batch(warm)
        .await
        .expect("a batch of photos");

    // This process's own memory (test harness, model, corpus) is the baseline.
    let baseline = rss_bytes();
    reset_peak_rss();

    for item in &images {
        let got = client.classify(classify(item.bytes.clone())).await;
        match (&got, item.expect) {
            (Ok(r), Code::Ok) => assert_eq!(r.get_ref().labels.len(), 1, "{}", describe(item)),
            (Err(status), expect) => {
                assert_eq!(status.code(), expect, "{}: {status:?}", describe(item));
                assert!(
                    status.message().starts_with("`image.encoded` "),
                    "{}: {}",
                    item.name,
                    status.message()
                );
            }
            (Ok(_), expect) => panic!("{}: OK, expected {expect:?}", describe(item)),
        }
    }
    // The strip that aborted the process: refused from its header, limit and value named.
    let strip = client
        .classify(classify(images[0].bytes.clone()))
        .await
        .unwrap_err();
    assert_eq!(images[0].name, "png_1x16000000_gray");
    assert_eq!(
        strip.message(),
        "`image.encoded` declares 1×16000000: aspect ratio 16000000:1 is over the limit (`vision.max_aspect_ratio`) 20:1"
    );
    let violation = strip
        .get_details_bad_request()
        .expect("a BadRequest detail");
    assert_eq!(violation.field_violations[0].field, "image.encoded");

    // All at once in one batch: up to `decode_workers` decode together.
    let out = client
        .classify_batch(batch(images.iter().map(|i| i.bytes.clone()).collect()))
        .await
        .expect("a batch of bad images is answered item by item")
        .into_inner();
    assert_eq!(out.items.len(), images.len());
    for (i, (item, got)) in images.iter().zip(&out.items).enumerate() {
        match (&got.result, item.expect) {
            (Some(ItemResult::Classification(c)), Code::Ok) => assert_eq!(c.labels.len(), 1),
            (Some(ItemResult::Error(e)), expect) => {
                assert_eq!(e.code, expect as i32, "{}: {e:?}", describe(item));
                assert_eq!(e.field, format!("images[{i}].encoded"), "{}", item.name);
            }
            (other, expect) => panic!("{}: {other:?}, expected {expect:?}", describe(item)),
        }
    }

    // Peak memory over the baseline: at most `decode_workers` decodes at a time, each bounded
    // by the limits (decoded bytes ≤ 4 × max_pixels, then its 3-byte RGB conversion), plus
    // slack for the requests and the allocator. Before the fix the first image alone asked
    // for 65 GB and aborted this process.
    let peak = peak_rss_bytes().saturating_sub(baseline);
    let bound = workers * 7 * max_pixels + (256 << 20);
    eprintln!(
        "baseline RSS {} MiB, peak over it {} MiB (bound {} MiB)",
        baseline >> 20,
        peak >> 20,
        bound >> 20
    );
    assert!(
        peak < bound,
        "peak {peak} bytes over the baseline, bound {bound}"
    );
    espresso_is_still_served(&server).await;
    server.shutdown.cancel();
}

// === item 9: bounded, deadline-aware decoding ===

/// 16 megapixels of grey from ~100 KB: cheap to send, a few hundred ms to decode and resize.
fn large_png() -> Vec<u8> {
    marquee_e2e::hostile::png_zeros(4_000, 4_000, 8, 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_batches_past_their_deadline_are_not_decoded() {
    let _turn = TURN.lock().await;
    let server = start_like_the_binary(vision_settings());
    let png = large_png();
    const CALLS: usize = 50;
    const PER_CALL: usize = 4;
    let calls = (0..CALLS).map(|_| {
        let server = server.clone();
        let png = png.clone();
        async move {
            let mut req = tonic::Request::new(batch(vec![png; PER_CALL]));
            req.set_timeout(Duration::from_millis(100));
            server.vision().await.classify_batch(req).await
        }
    });
    for r in join_all(calls).await {
        // Either the call timed out as a whole, or the server answered in time with every
        // image's own DEADLINE_EXCEEDED.
        match r {
            Ok(out) => assert!(
                out.get_ref().items.iter().all(|i| matches!(
                    &i.result,
                    Some(ItemResult::Error(e)) if e.code == Code::DeadlineExceeded as i32
                )),
                "4 large images cannot be decoded in 100 ms: {out:?}"
            ),
            Err(err) => assert!(
                matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
                "{err:?}"
            ),
        }
    }
    // Every image that reached the server either waits, is decoding, or has left the pool;
    // wait until none waits or decodes.
    wait_until(
        "the decode pool to drain",
        Duration::from_secs(60),
        || async {
            let idle = server.metric("marquee_vision_decode_queue_depth", &[]) == 0.0
                && server.metric("marquee_vision_decode_workers_busy", &[]) == 0.0;
            idle.then_some(())
        },
    )
    .await;
    // A caller with a normal deadline is served: the pool is not busy with abandoned work.
    espresso_is_still_served(&server).await;
    let started = server.metric("marquee_vision_decodes_started_total", &[]);
    let skipped = server.metric("marquee_vision_decodes_total", &[("outcome", "deadline")])
        + server.metric("marquee_vision_decodes_total", &[("outcome", "cancelled")]);
    eprintln!("decodes started {started}, skipped or stopped {skipped}");
    // Only images whose caller was still waiting got a worker: a handful per worker in the
    // 100 ms the callers waited, not the 200 the calls carried.
    assert!(
        started <= (CALLS * PER_CALL) as f64 / 4.0,
        "{started} decodes started for callers that left"
    );
    assert!(skipped > 0.0, "no decode was skipped or stopped");
    server.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_decode_queue_refuses_the_call_with_retry_info() {
    let _turn = TURN.lock().await;
    let mut settings = vision_settings();
    settings.vision.decode_workers = 1;
    settings.vision.max_batch_items = 4;
    settings.vision.decode_queue = 4;
    let server = start_like_the_binary(settings);
    // 36 megapixels: about a second each to decode, so the queue stays full while we look.
    let png = marquee_e2e::hostile::png_zeros(6_000, 6_000, 8, 0);
    let first = {
        let mut c = server.vision().await;
        let req = batch(vec![png.clone(); 4]);
        tokio::spawn(async move { c.classify_batch(req).await })
    };
    // One image decoding, three waiting: the queue (4) cannot take another batch of 4.
    wait_until(
        "the first batch to be admitted",
        Duration::from_secs(60),
        || async {
            let admitted = server.metric("marquee_vision_decodes_started_total", &[]) >= 1.0
                && server.metric("marquee_vision_decode_queue_depth", &[]) == 3.0;
            admitted.then_some(())
        },
    )
    .await;
    let err = server
        .vision()
        .await
        .classify_batch(batch(vec![png.clone(); 4]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("`vision.decode_queue`"),
        "{}",
        err.message()
    );
    let retry = err.get_details_retry_info().expect("RetryInfo");
    assert!(retry.retry_delay.is_some());
    assert_eq!(
        server.metric("marquee_vision_decodes_total", &[("outcome", "queue_full")]),
        4.0
    );
    // The admitted batch is served in full.
    let first = first.await.unwrap().expect("the first batch").into_inner();
    assert!(
        first
            .items
            .iter()
            .all(|i| matches!(i.result, Some(ItemResult::Classification(_))))
    );
    server.shutdown.cancel();
}
