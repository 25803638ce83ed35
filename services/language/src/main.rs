//! `marquee-language`: the model-service kit's `main` over the language service.

fn main() {
    marquee_core::serve::main(
        marquee_language::NAME,
        marquee_language::ABOUT,
        |settings, shutdown| async move {
            Ok(marquee_language::start(settings, shutdown).await?.into())
        },
    );
}
