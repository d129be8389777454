// Starts Swagger UI for /docs from the package's own copy (no CDN, no inline script).
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("swagger-ui");
  if (typeof window.SwaggerUIBundle !== "function") {
    root.textContent = "Swagger UI is not installed with this service: pip install swagger-ui-bundle-v2 " +
      "(part of the `service` extra). The OpenAPI schema is at /openapi.json.";
    return;
  }
  window.ui = window.SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
