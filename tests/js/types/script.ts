// A page that loads incoming.js from the server (<script src>) and uses the global.
/// <reference types="incoming-client/global" />

declare const chosen: File;
const upload = new incoming.Uploader("ticket", chosen);
upload.onfinished = (u) => console.log(u.result.length);
incoming.set_server_hostname("uploads.example.com:4000");
// @ts-expect-error the global has no such function
incoming.upload(chosen);
