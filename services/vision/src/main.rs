//! `marquee-vision`: the model-service kit's `main` over the vision service.

fn main() {
    marquee_core::serve::main(
        marquee_vision::NAME,
        marquee_vision::ABOUT,
        |settings, shutdown| async move { Ok(marquee_vision::start(settings, shutdown).await?.into()) },
    );
}
