"""The little browser-side behaviour Reflex has no component for, as one inline script:

* paste an image (Ctrl/Cmd+V) anywhere on a page with the image-query drop zone: the pasted file
  is handed to that zone's file input, so it takes exactly the path of a picked or dropped file;
* on touch screens the first tap on a result tile shows its caption (name and description) and
  the second tap opens the image, since a touch screen has no hover.

The script installs its listeners once per browser tab (client-side navigation keeps them).
"""

from __future__ import annotations

import reflex as rx

IMAGE_QUERY_ID = "image-query"

CLIENT_JS = """
(function () {
  if (window.__clipgalleryClient) return;
  window.__clipgalleryClient = true;

  document.addEventListener("paste", function (event) {
    var input = document.querySelector("#__ZONE__ input[type=file]");
    var data = event.clipboardData;
    if (!input || !data) return;
    var image = null;
    for (var i = 0; i < data.items.length && !image; i++) {
      var item = data.items[i];
      if (item.kind === "file" && item.type.indexOf("image/") === 0) image = item.getAsFile();
    }
    if (!image) return;  // ordinary text paste: leave it alone
    event.preventDefault();
    var ext = (image.type.split("/")[1] || "png").replace("jpeg", "jpg");
    var transfer = new DataTransfer();
    transfer.items.add(new File([image], "pasted-image." + ext, { type: image.type }));
    input.files = transfer.files;
    input.dispatchEvent(new Event("change", { bubbles: true }));
  });

  var lastPointer = "";
  document.addEventListener("pointerdown", function (event) { lastPointer = event.pointerType; }, true);
  document.addEventListener("click", function (event) {
    var link = event.target.closest && event.target.closest("a.cg-tile-link");
    if (!link || lastPointer !== "touch") return;
    var tile = link.closest(".cg-tile");
    if (!tile || tile.hasAttribute("data-revealed")) return;  // second tap: open the image
    event.preventDefault();
    event.stopPropagation();
    document.querySelectorAll(".cg-tile[data-revealed]").forEach(function (t) {
      t.removeAttribute("data-revealed");
    });
    tile.setAttribute("data-revealed", "");
  }, true);
})();
""".replace("__ZONE__", IMAGE_QUERY_ID)


def client_script() -> rx.Component:
    return rx.script(CLIENT_JS)
