//! `marquee-recommendation`: the model-service kit's `main` over the recommendation service.

fn main() {
    marquee_core::serve::main(
        marquee_recommendation::NAME,
        marquee_recommendation::ABOUT,
        |settings, shutdown| async move {
            Ok(marquee_recommendation::start(settings, shutdown)
                .await?
                .into())
        },
    );
}
