//! `marquee.language.v1.TextGeneration`: handlers validate, tokenize and hand work to the
//! model's engine; they never run the model themselves. (The Open Inference Protocol is the
//! kit's, over [`crate::family`].)

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;
use marquee_core::ServeError;
use marquee_core::config::ServerSettings;
use marquee_core::deadline::deadline;
use marquee_core::repository::{Repository, Served};
use marquee_proto::language::text_generation_server::TextGeneration;
use marquee_proto::language::{
    FinishReason, GenerateRequest, GenerateResponse, GenerateStreamResponse, GeneratedSequence,
    GenerationSummary, Token, TokenizeRequest, TokenizeResponse,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::engine::{Event, Finish, Job, Summary};
use crate::family::{LanguageFamily, LanguageModel};
use crate::validate;

/// A served version of a causal language model.
type Model = Served<LanguageModel>;

/// `marquee.language.v1.TextGeneration` over the models of the repository.
pub struct TextApi {
    repo: Arc<Repository<LanguageFamily>>,
    server: ServerSettings,
    max_prompt_bytes: usize,
    default_model: String,
    seeds: AtomicU64,
}

impl TextApi {
    pub fn new(
        repo: Arc<Repository<LanguageFamily>>,
        server: ServerSettings,
        language: &crate::LanguageSettings,
    ) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            repo,
            server,
            max_prompt_bytes: language.max_prompt_bytes,
            default_model: language.default_model.clone(),
            seeds: AtomicU64::new(now),
        }
    }

    /// The model a request names, or the default model for an empty name.
    fn model(&self, name: &str) -> Result<Arc<Model>, ServeError> {
        if name.is_empty() && !self.default_model.is_empty() {
            self.repo.get(&self.default_model)
        } else {
            self.repo.get_or_only(name)
        }
    }

    /// A fresh seed for requests that set none: distinct per request, reported back.
    fn fresh_seed(&self) -> u64 {
        let mut r = crate::sampling::Rng::new(self.seeds.fetch_add(1, Ordering::Relaxed));
        r.next_u64()
    }

    /// Validates and tokenizes a request and queues it on its model's engine.
    fn submit(
        &self,
        req: &GenerateRequest,
        deadline: Instant,
    ) -> Result<(Arc<Model>, mpsc::Receiver<Event>, usize), ServeError> {
        let m = self.model(&req.model)?;
        if req.prompt.is_empty() {
            return Err(ServeError::invalid("prompt", "`prompt` must not be empty"));
        }
        if req.prompt.len() > self.max_prompt_bytes {
            return Err(ServeError::TooLarge {
                field: "prompt".into(),
                message: format!(
                    "`prompt` is {} bytes; at most {} (`language.max_prompt_bytes`)",
                    req.prompt.len(),
                    self.max_prompt_bytes
                ),
            });
        }
        let params = validate::parameters(req.parameters.as_ref(), &m.limits, self.fresh_seed())?;
        let sequences = validate::sequences(req.parameters.as_ref(), &params, &m.limits)?;
        let mut prompt: Vec<u32> = m.bos.into_iter().collect();
        prompt.extend(
            m.vocab
                .encode(&req.prompt)
                .map_err(|e| ServeError::Internal(e.to_string()))?
                .into_iter()
                .map(|(id, _)| id),
        );
        validate::lengths(prompt.len(), params.max_new_tokens, &m.limits)?;
        let (tx, rx) = mpsc::channel(Job::channel_capacity(&params, sequences));
        m.engine.submit(Job {
            prompt,
            params,
            sequences,
            events: tx,
            arrived: Instant::now(),
            deadline,
            span: tracing::Span::current(),
        })?;
        Ok((m, rx, sequences))
    }
}

fn summary(s: &Summary, version: u64) -> GenerationSummary {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    GenerationSummary {
        finish_reason: match s.finish {
            Finish::Length => FinishReason::Length,
            Finish::Stop => FinishReason::Stop,
            Finish::Eos => FinishReason::Eos,
        } as i32,
        prompt_tokens: s.prompt_tokens as u32,
        generated_tokens: s.generated_tokens as u32,
        seed: s.seed,
        queue_ms: ms(s.queue),
        time_to_first_token_ms: ms(s.time_to_first_token),
        total_ms: ms(s.total),
        mean_inter_token_ms: ms(s.mean_inter_token),
        model_version: version.to_string(),
    }
}

type GenerateStreamBox =
    Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl TextGeneration for TextApi {
    async fn generate(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let deadline = deadline(req.metadata(), &self.server);
        let req = req.into_inner();
        let (m, mut rx, n) = self.submit(&req, deadline)?;
        let mut sequences: Vec<GeneratedSequence> = (0..n as u32)
            .map(|index| GeneratedSequence {
                index,
                ..Default::default()
            })
            .collect();
        let mut finished = 0;
        while let Some(event) = rx.recv().await {
            match event {
                Event::Tokens {
                    index,
                    text,
                    ids,
                    logprobs,
                } => {
                    let seq = &mut sequences[index];
                    seq.text.push_str(&text);
                    seq.token_ids.extend(ids);
                    seq.logprobs.extend(logprobs);
                }
                Event::Finished(s) => {
                    sequences[s.index].summary = Some(summary(&s, m.version));
                    finished += 1;
                    if finished == n {
                        let first = sequences[0].clone();
                        return Ok(Response::new(GenerateResponse {
                            model: m.name.clone(),
                            text: first.text,
                            token_ids: first.token_ids,
                            logprobs: first.logprobs,
                            summary: first.summary,
                            sequences,
                        }));
                    }
                }
                Event::Failed(e) => return Err(e.into()),
            }
        }
        Err(ServeError::Internal("the engine dropped a request without an answer".into()).into())
    }

    type GenerateStreamStream = GenerateStreamBox;

    async fn generate_stream(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let deadline = deadline(req.metadata(), &self.server);
        let req = req.into_inner();
        let (model, rx, n) = self.submit(&req, deadline)?;
        let version = model.version;
        // Dropping this stream (client cancel) drops `rx`; the engine sees the closed channel
        // and frees the sequences' slots at its next step.
        // A message per token while the client keeps up; when it falls behind, the tokens of one
        // sequence that queued up meanwhile go out as one message (fewer frames, same text and
        // ids), so a slow reader costs the server less instead of more.
        let stream = futures::stream::unfold(
            (rx, None::<Event>, 0usize),
            move |(mut rx, held, finished)| async move {
                if finished == n {
                    return None;
                }
                let first = match held {
                    Some(e) => e,
                    None => rx.recv().await?,
                };
                match first {
                    Event::Tokens {
                        index,
                        mut text,
                        mut ids,
                        mut logprobs,
                    } => {
                        let mut next = None;
                        while let Ok(e) = rx.try_recv() {
                            match e {
                                Event::Tokens {
                                    index: i,
                                    text: t,
                                    ids: more,
                                    logprobs: l,
                                } if i == index => {
                                    text.push_str(&t);
                                    ids.extend(more);
                                    logprobs.extend(l);
                                }
                                other => {
                                    next = Some(other);
                                    break;
                                }
                            }
                        }
                        let msg = GenerateStreamResponse {
                            text,
                            token_ids: ids,
                            logprobs,
                            summary: None,
                            index: index as u32,
                        };
                        Some((Ok(msg), (rx, next, finished)))
                    }
                    Event::Finished(s) => Some((
                        Ok(GenerateStreamResponse {
                            summary: Some(summary(&s, version)),
                            index: s.index as u32,
                            ..Default::default()
                        }),
                        (rx, None, finished + 1),
                    )),
                    Event::Failed(e) => Some((Err(e.into()), (rx, None, n))),
                }
            },
        );
        // The stream holds the version that took the request, so a hot reload that replaces it
        // meanwhile does not stop its engine under a running sequence.
        let stream = futures::StreamExt::map(stream, move |item| {
            let _version = &model;
            item
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        req: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let req = req.into_inner();
        let m = self.model(&req.model)?;
        if req.text.len() > self.max_prompt_bytes {
            return Err(ServeError::TooLarge {
                field: "text".into(),
                message: format!(
                    "`text` is {} bytes; at most {} (`language.max_prompt_bytes`)",
                    req.text.len(),
                    self.max_prompt_bytes
                ),
            }
            .into());
        }
        let encoded = m
            .vocab
            .encode(&req.text)
            .map_err(|e| ServeError::Internal(e.to_string()))?;
        let ids: Vec<u32> = encoded.iter().map(|(id, _)| *id).collect();
        let tokens = encoded
            .into_iter()
            .zip(m.vocab.token_texts(&ids))
            .map(|((id, (start, end)), text)| Token {
                id,
                text,
                start: start as u32,
                end: end as u32,
            })
            .collect();
        Ok(Response::new(TokenizeResponse { tokens }))
    }
}
