//! QR codes as SVG images, for what a phone's camera reads off a screen: an authenticator's
//! `otpauth://` URI, a device's provisioning payload.

/// `text` as a QR code in SVG, at least 200 × 200 pixels; `None` if it is too long for one.
pub fn svg(text: &str) -> Option<String> {
    qrcode::QrCode::new(text.as_bytes()).ok().map(|qr| {
        qr.render::<qrcode::render::svg::Color<'_>>()
            .min_dimensions(200, 200)
            .build()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_an_svg_and_refuses_what_does_not_fit() {
        let image = super::svg("otpauth://totp/x").expect("fits");
        assert!(
            image.starts_with("<?xml") && image.contains("<svg"),
            "{image}"
        );
        assert!(super::svg(&"x".repeat(8000)).is_none());
    }
}
