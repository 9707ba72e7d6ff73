() => {
  // Keyboard shortcuts, as in AUTOMATIC1111: Ctrl+Enter (Cmd+Enter on macOS) previews from anywhere
  // on the page; Esc stops a preview that is still streaming.
  const click = (selector, event) => {
    const button = document.querySelector(selector);
    if (!button || button.disabled) return;
    event.preventDefault();
    button.click();
  };
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) click("#preview-btn", event);
    else if (event.key === "Escape" && !event.ctrlKey && !event.metaKey) click("#stop-btn", event);
  });
}
