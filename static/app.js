() => {
  // Ctrl+Enter (Cmd+Enter on macOS) previews from anywhere on the page, as in AUTOMATIC1111.
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
    const button = document.querySelector("#preview-btn");
    if (!button || button.disabled) return;
    event.preventDefault();
    button.click();
  });
}
