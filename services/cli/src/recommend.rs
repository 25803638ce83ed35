//! `marquee recommend`: `Recommender.Recommend` for a user, with explanations on request.

use std::fmt::Write as _;

use marquee_proto::recommendation::recommend_request::Subject;
use marquee_proto::recommendation::{AnonymousContext, RecommendRequest, RecommendResponse};
use serde_json::{Value, json};

use crate::cli::RecommendArgs;
use crate::connection::Connection;
use crate::output::{Outcome, score_json};

pub async fn run(conn: &Connection, args: RecommendArgs, json: bool) -> anyhow::Result<Outcome> {
    let subject = match args.user {
        Some(user) => Some(Subject::UserId(user)),
        None => Some(Subject::Anonymous(AnonymousContext {
            recent_item_ids: args.recent,
        })),
    };
    let request = RecommendRequest {
        subject,
        k: args.k,
        diversity: args.diversity,
        explain: args.explain,
        ..Default::default()
    };
    let response = conn
        .call(conn.recommender().recommend(conn.request(request)))
        .await?;
    Ok(if json {
        Outcome::json(&to_json(&response), true)
    } else {
        Outcome::ok(to_text(&response))
    })
}

/// One line per item, best first, then its explanation indented under it.
fn to_text(r: &RecommendResponse) -> String {
    let mut out = String::new();
    if r.cold_start {
        out.push_str("(no history: cold-start results)\n");
    }
    for (i, item) in r.items.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:>2}. {:.3}  {} [{}]",
            i + 1,
            item.score,
            item.title,
            item.genres.join(", ")
        );
        if let Some(e) = &item.explanation {
            let because: Vec<&str> = e.because_of.iter().map(|h| h.title.as_str()).collect();
            if !because.is_empty() {
                let _ = writeln!(out, "      because you watched: {}", because.join("; "));
            }
            let features: Vec<String> = e
                .features
                .iter()
                .map(|f| format!("{} {:+.2}", f.name, f.contribution))
                .collect();
            if !features.is_empty() {
                let _ = writeln!(out, "      ranking features: {}", features.join(", "));
            }
        }
    }
    out
}

fn to_json(r: &RecommendResponse) -> Value {
    let items: Vec<Value> = r
        .items
        .iter()
        .map(|i| {
            json!({
                "item_id": i.item_id,
                "title": i.title,
                "genres": i.genres,
                "score": score_json(i.score),
                "because_of": i.explanation.as_ref().map(|e| e.because_of.iter().map(|h| h.title.clone()).collect::<Vec<_>>()),
            })
        })
        .collect();
    json!({ "cold_start": r.cold_start, "items": items, "model_version": r.model_version })
}
