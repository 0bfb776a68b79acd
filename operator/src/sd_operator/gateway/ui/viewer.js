// One dialog for a full-size image (a batch output, an evaluation cell, a history entry).
const $ = (id) => document.getElementById(id);

export function openViewer({ title, src, info, filename }) {
  const dialog = $("viewer");
  $("viewer-title").textContent = title;
  $("viewer-image").src = src;
  $("viewer-image").alt = title;
  $("viewer-info").textContent = info || "";
  $("viewer-info").hidden = !info;
  const download = $("viewer-download");
  download.href = src;
  download.download = filename || "image.png";
  if (!dialog.open) dialog.showModal();
  $("viewer-close").focus();
}

export function setUpViewer() {
  $("viewer-close").addEventListener("click", () => $("viewer").close());
}
