// The global `incoming` that incoming.js defines as a classic script (a page that loads it
// from the server with <script src>): `/// <reference types="incoming-client/global" />`.
import type { Incoming } from "./incoming.js";

declare global {
  var incoming: Incoming;
}

export {};
