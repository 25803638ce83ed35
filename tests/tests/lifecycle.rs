//! Hot reload and graceful shutdown, end to end.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use marquee_e2e::*;
use marquee_proto::vision::image_input::Source;
use marquee_proto::vision::image_service_client::ImageServiceClient;
use marquee_proto::vision::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn image(bytes: Vec<u8>) -> ImageInput {
    ImageInput {
        source: Some(Source::Encoded(bytes.into())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_is_swapped_in_without_failing_a_request() {
    let repo = temp_repo(&["fashion_cnn"]);
    let mut s = settings(repo.path());
    s.repository.poll_interval_ms = 50;
    s.repository.lanes = Some(1);
    let server = start(s).await;
    let (images, _) = fashion_test_set(8);
    let failures = Arc::new(AtomicUsize::new(0));
    let seen_v2 = Arc::new(AtomicBool::new(false));
    let calls_at_v1 = Arc::new(AtomicUsize::new(0));
    let mut loopers = Vec::new();
    for pixels in images.iter().take(4) {
        let mut client = ImageServiceClient::new(server.channel().await);
        let png = png_gray(pixels, 28, 28);
        let (failures, seen_v2, calls_at_v1) =
            (failures.clone(), seen_v2.clone(), calls_at_v1.clone());
        loopers.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            // Runs until this client has seen version 2 twenty times (bounded by the timeout below).
            while versions.iter().filter(|v| *v == "2").count() < 20 {
                let req = ClassifyRequest {
                    model: "fashion_cnn".into(),
                    image: Some(image(png.clone())),
                    top_k: 1,
                };
                match client.classify(req).await {
                    Ok(r) => {
                        let v = r.into_inner().model_version;
                        if v == "1" {
                            calls_at_v1.fetch_add(1, Ordering::Relaxed);
                        } else {
                            seen_v2.store(true, Ordering::Relaxed);
                        }
                        versions.push(v);
                    }
                    Err(e) => {
                        eprintln!("call failed during reload: {e:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            versions
        }));
    }
    // Drop in version 2 only once traffic is flowing on version 1.
    wait_until("40 calls on version 1", Duration::from_secs(60), || async {
        (calls_at_v1.load(Ordering::Relaxed) >= 40).then_some(())
    })
    .await;
    let staging = repo.path().join("fashion_cnn/.2-staging");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::copy(
        repo.path().join("fashion_cnn/1/model.pt"),
        staging.join("model.pt"),
    )
    .unwrap();
    std::fs::rename(&staging, repo.path().join("fashion_cnn/2")).unwrap();
    let results =
        tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(loopers))
            .await
            .expect("clients saw version 2 within 2 minutes");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no request failed during the swap"
    );
    for versions in results {
        let versions = versions.unwrap();
        let first_v2 = versions.iter().position(|v| v == "2").unwrap();
        assert!(
            versions[first_v2..].iter().all(|v| v == "2"),
            "once on version 2, never back: {versions:?}"
        );
    }
    assert!(seen_v2.load(Ordering::Relaxed));
    assert_eq!(
        server.metric(
            "marquee_model_ready",
            &[("model", "fashion_cnn"), ("version", "2")]
        ),
        1.0
    );
    assert_eq!(
        server.metric(
            "marquee_model_ready",
            &[("model", "fashion_cnn"), ("version", "1")]
        ),
        0.0
    );
    server.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reports_not_serving_finishes_in_flight_calls_then_refuses_new_ones() {
    let mut child = Command::new(workspace_binary("marquee-vision"))
        .env("MARQUEE__SERVER__GRPC_ADDR", "127.0.0.1:0")
        .env("MARQUEE__SERVER__ADMIN_ADDR", "127.0.0.1:0")
        .env("MARQUEE__SERVER__DRAIN_DELAY_MS", "300")
        .env("MARQUEE__REPOSITORY__PATH", model_repo())
        .env("MARQUEE__REPOSITORY__MODELS", "efficientnet_lite0")
        .env("MARQUEE__REPOSITORY__LANES", "1")
        .env("MARQUEE__REPOSITORY__THREADS", "1")
        .env("MARQUEE__REPOSITORY__PROFILE_BATCHING", "false")
        .env("MARQUEE__REPOSITORY__POLL_INTERVAL_MS", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let grpc = line
        .split("grpc=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let admin: std::net::SocketAddr = line.split("admin=").nth(1).unwrap().trim().parse().unwrap();
    let url = format!("http://{grpc}");
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    // Work that keeps the single lane busy well past the drain delay: preprocessed tensors (no
    // decoding, which in a debug build is slower than the model and kept the queue short), more
    // than the lane takes in one batch, so some always wait while it computes.
    let tensor = ImageInput {
        source: Some(Source::Tensor(marquee_proto::common::Tensor {
            shape: vec![3, 224, 224],
            float_data: vec![0.1; 3 * 224 * 224],
            raw_data: Default::default(),
        })),
    };
    let in_flight: Vec<_> = (0..8)
        .map(|_| {
            let mut c = ImageServiceClient::new(channel.clone());
            let req = ClassifyBatchRequest {
                model: "efficientnet_lite0".into(),
                images: vec![tensor.clone(); 8],
                top_k: 1,
            };
            tokio::spawn(async move { c.classify_batch(req).await })
        })
        .collect();
    // SIGTERM only once work is queued (observed on the admin port, not slept).
    wait_until("queued images", Duration::from_secs(60), || async {
        let (_, body) = http_get(admin, "/metrics").await;
        let queued = body
            .lines()
            .find(|l| l.starts_with("marquee_batcher_queue_depth{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        (queued >= 8.0).then_some(())
    })
    .await;
    // SAFETY: kill(2) on a child process this test spawned and still owns.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);

    // Readiness flips first, while the calls are still running.
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    assert!(
        in_flight.iter().any(|h| !h.is_finished()),
        "work is still in flight when NOT_SERVING is reported"
    );

    // Once the listener closes, new connections are refused while old calls finish.
    let refused_while_busy =
        wait_until("the listener to close", Duration::from_secs(60), || async {
            let refused = tonic::transport::Channel::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .is_err();
            refused.then(|| in_flight.iter().any(|h| !h.is_finished()))
        })
        .await;
    assert!(
        refused_while_busy,
        "new connections were refused while in-flight calls were still running"
    );

    for h in in_flight {
        let resp = h
            .await
            .unwrap()
            .expect("in-flight call completes after SIGTERM")
            .into_inner();
        assert_eq!(resp.items.len(), 8);
        assert!(resp.items.iter().all(|i| matches!(
            i.result,
            Some(classify_batch_item::Result::Classification(_))
        )));
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "clean exit after drain: {status:?}");
}
