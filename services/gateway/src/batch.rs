//! Cross-client batching: single-image `Classify` calls for the same model and `top_k` from
//! any number of clients are coalesced into one `ClassifyBatch` backend call.
//!
//! A batch goes out at once whenever fewer than `max_batches_in_flight` batch calls are
//! running, so a lone call never waits; while the backend is busy, items accumulate and go out
//! together when a call returns, when `max_batch` items are waiting, or after
//! `max_batch_delay_us`. Each caller gets exactly its own result, and a bad image fails only its
//! own call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use marquee_proto::vision::classify_batch_item::Result as ItemResult;
use marquee_proto::vision::image_service_client::ImageServiceClient;
use marquee_proto::vision::{ClassifyBatchRequest, ClassifyRequest, ImageInput, Label};
use tokio::sync::oneshot;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::backend::{BackendPool, outgoing};
use crate::config::Route;
use crate::error::GatewayError;
use crate::metrics::GatewayMetrics;

/// One image waiting for its batch.
struct Pending {
    image: ImageInput,
    deadline: Instant,
    tx: oneshot::Sender<Result<Labelled, GatewayError>>,
}

/// A caller's answer: the labels and the model version that computed them.
pub type Labelled = (Vec<Label>, String);

struct State {
    items: Vec<Pending>,
    in_flight: usize,
    timer_armed: bool,
}

/// The coalescer of one (model, top_k).
pub struct Coalescer {
    model: String,
    top_k: u32,
    route: Route,
    backend: Arc<BackendPool>,
    metrics: GatewayMetrics,
    state: Mutex<State>,
}

impl Coalescer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one image and waits for its labels.
    pub async fn classify(
        self: &Arc<Self>,
        image: ImageInput,
        deadline: Instant,
    ) -> Result<Labelled, GatewayError> {
        let (tx, rx) = oneshot::channel();
        let send_now = {
            let mut st = self.lock();
            st.items.push(Pending {
                image,
                deadline,
                tx,
            });
            if st.in_flight < self.route.max_batches_in_flight
                || st.items.len() >= self.route.max_batch
            {
                Some(self.take(&mut st))
            } else {
                if !st.timer_armed {
                    st.timer_armed = true;
                    let me = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_micros(me.route.max_batch_delay_us))
                            .await;
                        let batch = {
                            let mut st = me.lock();
                            st.timer_armed = false;
                            (!st.items.is_empty()).then(|| me.take(&mut st))
                        };
                        if let Some(b) = batch {
                            me.send(b).await;
                        }
                    });
                }
                None
            }
        };
        if let Some(batch) = send_now {
            let me = self.clone();
            tokio::spawn(async move { me.send(batch).await });
        }
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(GatewayError::Unavailable("batch was dropped".into())),
            Err(_) => Err(marquee_core::ServeError::DeadlineExceeded(format!(
                "deadline expired waiting for model `{}` through the gateway",
                self.model
            ))
            .into()),
        }
    }

    fn take(&self, st: &mut State) -> Vec<Pending> {
        st.in_flight += 1;
        let n = st.items.len().min(self.route.max_batch);
        st.items.drain(..n).collect()
    }

    /// Sends one batch, hands each caller its result, then sends what queued meanwhile.
    async fn send(self: Arc<Self>, mut batch: Vec<Pending>) {
        loop {
            // Callers that already gave up need no compute.
            batch.retain(|p| !p.tx.is_closed());
            if !batch.is_empty() {
                self.metrics
                    .batch_size
                    .with_label_values(&["vision.classify"])
                    .observe(batch.len() as f64);
                let deadline = batch
                    .iter()
                    .map(|p| p.deadline)
                    .max()
                    .expect("non-empty, this is a bug");
                self.dispatch(batch, deadline).await;
            }
            let next = {
                let mut st = self.lock();
                st.in_flight -= 1;
                (!st.items.is_empty()).then(|| self.take(&mut st))
            };
            match next {
                Some(b) => batch = b,
                None => return,
            }
        }
    }

    async fn dispatch(&self, batch: Vec<Pending>, deadline: Instant) {
        let (model, top_k) = (self.model.clone(), self.top_k);
        if batch.len() == 1 {
            // One item: the plain call is cheaper for the backend than a batch of one.
            let p = batch.into_iter().next().expect("one item, this is a bug");
            let image = p.image.clone();
            let r = self
                .backend
                .call(
                    "marquee.vision.v1.ImageService/Classify",
                    deadline,
                    |ch, t| {
                        let req = ClassifyRequest {
                            model: model.clone(),
                            image: Some(image.clone()),
                            top_k,
                        };
                        async move {
                            ImageServiceClient::new(ch)
                                .max_decoding_message_size(64 << 20)
                                .classify(outgoing(req, t))
                                .await
                        }
                    },
                )
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (r.labels, r.model_version)
                });
            let _ = p.tx.send(r);
            return;
        }
        let images: Vec<ImageInput> = batch.iter().map(|p| p.image.clone()).collect();
        let result = self
            .backend
            .call(
                "marquee.vision.v1.ImageService/ClassifyBatch",
                deadline,
                |ch, t| {
                    let req = ClassifyBatchRequest {
                        model: model.clone(),
                        images: images.clone(),
                        top_k,
                    };
                    async move {
                        ImageServiceClient::new(ch)
                            .max_decoding_message_size(64 << 20)
                            .classify_batch(outgoing(req, t))
                            .await
                    }
                },
            )
            .await;
        match result {
            Ok(resp) => {
                let resp = resp.into_inner();
                if resp.items.len() != batch.len() {
                    for p in batch {
                        let _ = p.tx.send(Err(GatewayError::Unavailable(
                            "backend returned a short batch".into(),
                        )));
                    }
                    return;
                }
                for (p, item) in batch.into_iter().zip(resp.items) {
                    let r = match item.result {
                        Some(ItemResult::Classification(c)) => {
                            Ok((c.labels, resp.model_version.clone()))
                        }
                        Some(ItemResult::Error(e)) => Err(GatewayError::Backend(item_status(e))),
                        None => Err(GatewayError::Unavailable(
                            "backend returned an empty item".into(),
                        )),
                    };
                    let _ = p.tx.send(r);
                }
            }
            Err(e) => {
                // A call-level failure (e.g. every replica down) fails every item of the batch.
                let status: Status = e.into();
                for p in batch {
                    let _ = p.tx.send(Err(GatewayError::Backend(Status::new(
                        status.code(),
                        status.message().to_string(),
                    ))));
                }
            }
        }
    }
}

/// The status a caller would have got calling `Classify` on its own, field renamed to the
/// single-call request (`images[i].encoded` → `image.encoded`).
fn item_status(e: marquee_proto::common::ItemError) -> Status {
    let field = match e.field.split_once('.') {
        Some((head, rest)) if head.starts_with("images[") => format!("image.{rest}"),
        _ if e.field.starts_with("images[") => "image".to_string(),
        _ => e.field.clone(),
    };
    let message = e.message.replace(&e.field, &field);
    let code = Code::from_i32(e.code);
    if field.is_empty() {
        Status::new(code, message)
    } else {
        Status::with_error_details(
            code,
            message.clone(),
            ErrorDetails::with_bad_request_violation(field, message),
        )
    }
}

/// Every coalescer, by (model, top_k).
pub struct Coalescers {
    route: Route,
    metrics: GatewayMetrics,
    map: Mutex<HashMap<(String, u32), Arc<Coalescer>>>,
}

impl Coalescers {
    pub fn new(route: Route, metrics: GatewayMetrics) -> Self {
        Self {
            route,
            metrics,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, model: &str, top_k: u32, backend: &Arc<BackendPool>) -> Arc<Coalescer> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((model.to_string(), top_k))
            .or_insert_with(|| {
                Arc::new(Coalescer {
                    model: model.to_string(),
                    top_k,
                    route: self.route.clone(),
                    backend: backend.clone(),
                    metrics: self.metrics.clone(),
                    state: Mutex::new(State {
                        items: Vec::new(),
                        in_flight: 0,
                        timer_armed: false,
                    }),
                })
            })
            .clone()
    }
}
